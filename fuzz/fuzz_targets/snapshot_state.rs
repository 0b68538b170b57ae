//! The snapshot state loader on arbitrary bytes: it must refuse garbage with an error, never
//! panic, hang or allocate beyond its limit. Inputs that do not start with the magic are
//! wrapped in a valid header (with their CRC), so the fuzzer reaches the decoder and the
//! state checks instead of stopping at the checksum.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.snap");
    if data.starts_with(&vmm::snapshot::MAGIC) {
        let _ = vmm::snapshot::parse_state(path, data);
        return;
    }
    let mut file = Vec::with_capacity(data.len() + 24);
    file.extend_from_slice(&vmm::snapshot::MAGIC);
    file.extend_from_slice(&vmm::snapshot::FORMAT_VERSION.to_le_bytes());
    file.extend_from_slice(&(data.len() as u64).to_le_bytes());
    file.extend_from_slice(&crc32(data).to_le_bytes());
    file.extend_from_slice(data);
    let _ = vmm::snapshot::parse_state(path, &file);
});

/// CRC-32 (IEEE), as the state file uses.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}
