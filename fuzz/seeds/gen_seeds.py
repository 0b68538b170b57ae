#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/seeds/<target>/ from the unit tests' request shapes
(devices/src/virtio/tests.rs and block/request.rs): a valid read, write, flush and get-id,
plus a few hostile variants. Run from anywhere: python3 fuzz/seeds/gen_seeds.py"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
DESC, AVAIL, USED, INDIRECT, HDR, DATA = 0x1000, 0x3000, 0x4000, 0x5000, 0x8000, 0x10000
EDGE, HOLE = 0x80000, 0x100000
NEXT, WRITE, INDIR = 1, 2, 4
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8


def desc(addr, length, flags=0, nxt=0):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def layout(descs, heads=(0,), rtype=T_IN, sector=0, ro=False, qlog2=4, sectors=16,
           indirect=(), data=b"\xab" * 64, event_idx=False):
    flags = (1 if ro else 0) | (2 if event_idx else 0) | (qlog2 << 4)
    out = struct.pack("<BBHBBBB", flags, sectors, len(heads), len(heads), len(descs),
                      len(indirect), 0)
    out += struct.pack("<IIQ", rtype, 0, sector)
    out += b"".join(struct.pack("<H", h) for h in heads)
    out += b"".join(descs) + b"".join(indirect) + data
    return out


def request(rtype, data_len, data_flags, sector=0, **kw):
    """header -> [data] -> status, as Rig::submit in devices/src/virtio/tests.rs."""
    if data_len:
        d = [desc(HDR, 16, NEXT, 1), desc(DATA, data_len, data_flags | NEXT, 2),
             desc(DATA + 0x8000, 1, WRITE, 0)]
    else:
        d = [desc(HDR, 16, NEXT, 1), desc(DATA + 0x8000, 1, WRITE, 0)]
    return layout(d, rtype=rtype, sector=sector, **kw)


def blk_seeds():
    s = {
        "read_2048": request(T_IN, 2048, WRITE, sector=1),
        "write_1024": request(T_OUT, 1024, 0, sector=2),
        "flush": request(T_FLUSH, 0, 0),
        "get_id": request(T_GET_ID, 20, WRITE),
        "unsupported": request(77, 0, 0),
        "read_past_end": request(T_IN, 512, WRITE, sector=16),
        "read_unaligned": request(T_IN, 100, WRITE),
        "ro_write": request(T_OUT, 512, 0, ro=True),
        "ro_read": request(T_IN, 512, WRITE, ro=True),
        "read_event_idx": request(T_IN, 512, WRITE, event_idx=True),
        # Header and buffers behind an indirect table.
        "indirect_read": layout(
            [desc(INDIRECT, 48, INDIR, 0)],
            indirect=[desc(HDR, 16, NEXT, 1), desc(DATA, 1024, WRITE | NEXT, 2),
                      desc(DATA + 0x8000, 1, WRITE, 0)]),
        # A data buffer straddling the boundary of two memory regions.
        "straddle_write": layout(
            [desc(HDR, 16, NEXT, 1), desc(EDGE - 512, 1024, NEXT, 2),
             desc(DATA + 0x8000, 1, WRITE, 0)], rtype=T_OUT),
        "straddle_read": layout(
            [desc(HDR, 16, NEXT, 1), desc(EDGE - 256, 512, WRITE | NEXT, 2),
             desc(DATA + 0x8000, 1, WRITE, 0)]),
        # Hostile: a loop, a buffer in the hole, a huge length, a bad next index.
        "loop": layout([desc(HDR, 16, NEXT, 1), desc(DATA, 512, WRITE | NEXT, 0)]),
        "hole": layout([desc(HDR, 16, NEXT, 1), desc(HOLE, 512, WRITE | NEXT, 2),
                        desc(DATA + 0x8000, 1, WRITE, 0)]),
        "huge_len": layout([desc(HDR, 16, NEXT, 1), desc(DATA, 0xffffffff, WRITE, 0)]),
        "bad_next": layout([desc(HDR, 16, NEXT, 200)]),
        # Several requests in one pass: write, flush, read back.
        "three_heads": layout(
            [desc(HDR, 16, NEXT, 1), desc(DATA, 512, NEXT, 2), desc(DATA + 0x8000, 1, WRITE, 0),
             desc(HDR, 16, NEXT, 4), desc(DATA + 0x8001, 1, WRITE, 0)],
            heads=(0, 3, 0), rtype=T_OUT),
    }
    return s


# virtio_mmio operations (see fuzz_targets/virtio_mmio.rs, Op::decode).
def op_read(off, size=4): return struct.pack("<BHB", 0, off, size)
def op_write(off, data): return struct.pack("<BHB", 1, off, len(data)) + data
def op_reg(reg_index, value): return struct.pack("<BBI", 2, reg_index, value)
def op_negotiate(lo=0): return struct.pack("<BI", 3, lo)
def op_setup(log2=4): return struct.pack("<BB", 4, log2)
def op_desc(i, d): return struct.pack("<BB", 5, i) + d
def op_publish(head): return struct.pack("<BH", 6, head)
def op_mem(off, data): return struct.pack("<BHB", 7, off, len(data)) + data
def op_settle(): return b"\x08"

STATUS_REG = 8   # index of 0x070 in REGS
NOTIFY_REG = 6   # index of 0x050 in REGS
ALL_OK = 1 | 2 | 4 | 8


def mmio(kind, sectors, ops):
    return bytes([kind | (sectors << 2)]) + b"".join(ops)


def blk_ops(rtype, data_len, data_flags, sector=0):
    hdr = struct.pack("<IIQ", rtype, 0, sector)
    # The header lives in the data area (WriteMem writes relative to DATA).
    ops = [op_mem(0x100, hdr)]
    if data_len:
        ops += [op_desc(0, desc(DATA + 0x100, 16, NEXT, 1)),
                op_desc(1, desc(DATA + 0x1000, data_len, data_flags | NEXT, 2)),
                op_desc(2, desc(DATA + 0x200, 1, WRITE, 0))]
    else:
        ops += [op_desc(0, desc(DATA + 0x100, 16, NEXT, 1)),
                op_desc(1, desc(DATA + 0x200, 1, WRITE, 0))]
    return ops + [op_publish(0), op_reg(NOTIFY_REG, 0), op_settle()]


def mmio_seeds():
    probe = [op_read(0x0), op_read(0x4), op_read(0x8), op_read(0xc), op_read(0x10),
             op_reg(0, 1), op_read(0x10), op_read(0x34), op_read(0x100, 8), op_read(0x104, 4),
             op_read(0x2, 2), op_write(0x70, b"\x01")]
    up = [op_negotiate(1 << 9), op_setup(4), op_reg(STATUS_REG, ALL_OK)]
    s = {
        "probe_blk": mmio(0, 8, probe),
        "probe_rng": mmio(2, 0, probe),
        "blk_read": mmio(0, 8, up + blk_ops(T_IN, 1024, WRITE, 1) + [op_read(0x60), op_read(0x70)]),
        "blk_write": mmio(0, 8, up + blk_ops(T_OUT, 512, 0, 2) + blk_ops(T_FLUSH, 0, 0)),
        "blk_get_id": mmio(0, 8, up + blk_ops(T_GET_ID, 20, WRITE)),
        "blk_ro_write": mmio(1, 8, up + blk_ops(T_OUT, 512, 0)),
        "rng_fill": mmio(2, 0, up + [op_desc(0, desc(DATA, 100, WRITE | NEXT, 1)),
                                     op_desc(1, desc(DATA + 0x1000, 28, WRITE, 0)),
                                     op_publish(0), op_reg(NOTIFY_REG, 0), op_settle()]),
        "rng_hostile": mmio(2, 0, up + [op_desc(0, desc(DATA, 16, WRITE | NEXT, 1)),
                                        op_desc(1, desc(DATA, 16, WRITE | NEXT, 0)),
                                        op_desc(2, desc(0xdead00000000, 4096, WRITE, 0)),
                                        op_publish(0), op_publish(2), op_publish(77),
                                        op_reg(NOTIFY_REG, 0), op_settle()]),
        # DRIVER_OK before FEATURES_OK, a bad queue size, then a reset and a proper bring-up.
        "bad_setup_then_reset": mmio(0, 8, [op_reg(STATUS_REG, 1), op_reg(STATUS_REG, 3),
                                            op_reg(STATUS_REG, 7), op_read(0x70), op_read(0x60),
                                            op_reg(STATUS_REG, 0), op_negotiate(),
                                            op_setup(9), op_reg(STATUS_REG, ALL_OK),
                                            op_read(0x70), op_reg(STATUS_REG, 0)] + up
                                     + blk_ops(T_IN, 512, WRITE)),
    }
    return s


for target, seeds in (("blk_request", blk_seeds()), ("descriptor_chain", blk_seeds()),
                      ("virtio_mmio", mmio_seeds())):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
