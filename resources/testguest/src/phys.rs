//! Access to guest-physical memory from ring 3.
//!
//! The page tables identity-map all guest RAM and the MMIO hole with every level user-accessible,
//! so a physical address is a valid ring-3 pointer. These helpers are the only place that turns
//! an address into a pointer; callers check that the address lies in a mapped range.

/// Highest address (exclusive) mapped by the static page tables; more is mapped by `paging`.
pub const STATIC_MAP_END: u64 = 1 << 32;

/// Reads a byte from physical memory.
pub fn read_u8(addr: u64) -> u8 {
    // SAFETY: `addr` is identity-mapped and user-accessible (see the module docs); a byte read
    // has no alignment requirement and the value is plain data.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

/// Reads a little-endian u16 (any alignment).
pub fn read_u16(addr: u64) -> u16 {
    // SAFETY: as for `read_u8`; `read_unaligned` has no alignment requirement.
    unsafe { core::ptr::read_unaligned(addr as *const u16) }
}

/// Reads a little-endian u32 (any alignment).
pub fn read_u32(addr: u64) -> u32 {
    // SAFETY: as for `read_u8`; `read_unaligned` has no alignment requirement.
    unsafe { core::ptr::read_unaligned(addr as *const u32) }
}

/// Reads a little-endian u64 (any alignment).
pub fn read_u64(addr: u64) -> u64 {
    // SAFETY: as for `read_u8`; `read_unaligned` has no alignment requirement.
    unsafe { core::ptr::read_unaligned(addr as *const u64) }
}

/// Writes a u64 to physical memory (aligned).
pub fn write_u64(addr: u64, value: u64) {
    debug_assert!(addr & 7 == 0);
    // SAFETY: `addr` is identity-mapped, user-accessible and 8-byte aligned; callers only write
    // memory the guest owns (page tables in .bss, RAM outside the image, the IDT).
    unsafe { core::ptr::write_volatile(addr as *mut u64, value) }
}

/// Reads an aligned 32-bit MMIO register.
pub fn mmio_read_u32(addr: u64) -> u32 {
    // SAFETY: `addr` is 4-byte aligned and lies in the identity map below 4 GiB (the caller
    // checks); a read of a device register exits to the VMM and has no effect on our memory.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Borrows a 4 KiB page of RAM as words.
///
/// # Safety
/// `addr` must be 4 KiB aligned, identity-mapped RAM that nothing else in the guest uses (not
/// the image, stacks or page tables) and no other reference to it may be alive.
pub unsafe fn page_mut(addr: u64) -> &'static mut [u64; 512] {
    // SAFETY: the caller guarantees exclusive access to mapped, aligned RAM.
    unsafe { &mut *(addr as *mut [u64; 512]) }
}

/// Copies a byte string from physical memory into `buf`, stopping at NUL or `max` bytes.
pub fn read_cstr(addr: u64, max: usize, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < max && n < buf.len() {
        let b = read_u8(addr + n as u64);
        if b == 0 {
            break;
        }
        buf[n] = b;
        n += 1;
    }
    n
}

/// Writes an aligned 32-bit MMIO register.
pub fn mmio_write_u32(addr: u64, value: u32) {
    debug_assert!(addr & 3 == 0);
    // SAFETY: `addr` is 4-byte aligned and lies in the identity-mapped MMIO hole (the caller
    // checks); the write exits to the VMM or KVM and does not touch our memory.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

/// Writes a byte to physical memory.
pub fn write_u8(addr: u64, value: u8) {
    // SAFETY: as for `write_u64`; a byte store has no alignment requirement.
    unsafe { core::ptr::write_volatile(addr as *mut u8, value) }
}

/// Writes a u16 to physical memory (aligned).
pub fn write_u16(addr: u64, value: u16) {
    debug_assert!(addr & 1 == 0);
    // SAFETY: as for `write_u64`: identity-mapped, user-accessible, aligned memory the guest
    // owns (callers pass addresses from the DMA arena).
    unsafe { core::ptr::write_volatile(addr as *mut u16, value) }
}

/// Writes a u32 to physical memory (aligned).
pub fn write_u32(addr: u64, value: u32) {
    debug_assert!(addr & 3 == 0);
    // SAFETY: as for `write_u16`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

/// Borrows `len` bytes of RAM.
///
/// # Safety
/// `[addr, addr + len)` must be identity-mapped RAM that the guest owns (from the DMA arena,
/// not the image, stacks or page tables), no device may write it while the borrow lives, and
/// no other reference to it may be alive.
pub unsafe fn bytes_mut(addr: u64, len: usize) -> &'static mut [u8] {
    // SAFETY: the caller guarantees exclusive access to mapped RAM of that length.
    unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, len) }
}

/// Reads an aligned u16 that a device may change (volatile: read on every call).
pub fn load_u16(addr: u64) -> u16 {
    debug_assert!(addr & 1 == 0);
    // SAFETY: identity-mapped, user-accessible, aligned RAM (a ring the guest set up).
    unsafe { core::ptr::read_volatile(addr as *const u16) }
}

/// Reads an aligned u32 that a device may change (volatile).
pub fn load_u32(addr: u64) -> u32 {
    debug_assert!(addr & 3 == 0);
    // SAFETY: as for `load_u16`.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Reads `size` (1, 2, 4 or 8) bytes of MMIO at `addr`, zero-extended.
pub fn mmio_read(addr: u64, size: u64) -> u64 {
    // SAFETY: `addr` lies in the identity-mapped, uncached MMIO hole (the caller checks); a load
    // there exits to the VMM or KVM and does not touch our memory. MOV allows any alignment.
    unsafe {
        match size {
            1 => u64::from(core::ptr::read_volatile(addr as *const u8)),
            2 => u64::from(core::ptr::read_volatile(addr as *const u16)),
            4 => u64::from(core::ptr::read_volatile(addr as *const u32)),
            _ => core::ptr::read_volatile(addr as *const u64),
        }
    }
}

/// Writes the low `size` (1, 2, 4 or 8) bytes of `value` to MMIO at `addr`.
pub fn mmio_write(addr: u64, size: u64, value: u64) {
    // SAFETY: as for `mmio_read`: a store to the MMIO hole exits to the VMM or KVM.
    unsafe {
        match size {
            1 => core::ptr::write_volatile(addr as *mut u8, value as u8),
            2 => core::ptr::write_volatile(addr as *mut u16, value as u16),
            4 => core::ptr::write_volatile(addr as *mut u32, value as u32),
            _ => core::ptr::write_volatile(addr as *mut u64, value),
        }
    }
}
