#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use super::*;
use crate::config::BootProtocolChoice;
use crate::loader::{load_initrd, load_kernel, LoadedKernel};
use vm_memory::Bytes;

/// A file in the temporary directory, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, bytes: &[u8]) -> Self {
        let path = std::env::temp_dir().join(format!(
            "anvil-file-pages-{}-{name}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, bytes).unwrap();
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const LOAD_ADDR: u64 = 0x20_0000;

/// Segment bytes that differ from page to page and byte to byte.
fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ (i / PAGE) as u8)
        .collect()
}

/// A 64-bit x86 ELF with one PT_LOAD segment of `data` at file offset `offset`, loaded at
/// LOAD_ADDR with `bss` bytes of zeroes after it; junk (0xee) follows the segment in the
/// file, so a page mapped past the segment's end would show.
fn elf(offset: usize, data: &[u8], bss: usize) -> Vec<u8> {
    let mut f = vec![0u8; offset];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // ELFCLASS64
    f[5] = 1; // little endian
    f[6] = 1; // EV_CURRENT
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let ph = &mut f[64..120];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&7u32.to_le_bytes()); // RWX
    ph[8..16].copy_from_slice(&(offset as u64).to_le_bytes());
    ph[16..24].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // p_vaddr
    ph[24..32].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // p_paddr
    ph[32..40].copy_from_slice(&(data.len() as u64).to_le_bytes()); // p_filesz
    ph[40..48].copy_from_slice(&((data.len() + bss) as u64).to_le_bytes()); // p_memsz
    ph[48..56].copy_from_slice(&(PAGE as u64).to_le_bytes()); // p_align
    f.extend_from_slice(data);
    f.extend(std::iter::repeat_n(0xee, 2 * PAGE));
    f
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

/// Loads an ELF whose segment ends mid-page with a bss after it; returns the memory, what
/// was mapped, the segment's bytes and the file.
fn load_partial_segment() -> (GuestMemoryMmap, FileMappings, Vec<u8>, TempFile) {
    let data = pattern(20 * PAGE + 123);
    let file = TempFile::new("kernel", &elf(PAGE, &data, 3 * PAGE + 77));
    let mem = memory();
    let mut mapped = FileMappings::default();
    load_kernel(&mem, &file.0, BootProtocolChoice::Auto, &mut mapped).unwrap();
    (mem, mapped, data, file)
}

#[test]
fn whole_pages_are_mapped_and_the_partial_last_page_and_bss_read_as_a_copy_would() {
    let (mem, mapped, data, file) = load_partial_segment();
    assert_eq!(
        mapped.ranges(),
        [MappedRange {
            addr: GuestAddress(LOAD_ADDR),
            len: 20 * PAGE,
            path: file.0.clone(),
        }]
    );
    assert_eq!(read(&mem, LOAD_ADDR, data.len()), data);
    // The rest of the last page and the bss are zero, not the junk that follows in the file.
    let bss = read(&mem, LOAD_ADDR + data.len() as u64, 4 * PAGE);
    assert!(bss.iter().all(|&b| b == 0), "bss is not zero");
}

#[test]
fn a_segment_whose_offset_and_address_disagree_is_copied() {
    let data = pattern(20 * PAGE + 5);
    // File offset 0x1010 against guest address 0x200000: no page can be mapped.
    let file = TempFile::new("misaligned", &elf(PAGE + 0x10, &data, PAGE));
    let mem = memory();
    let mut mapped = FileMappings::default();
    load_kernel(&mem, &file.0, BootProtocolChoice::Auto, &mut mapped).unwrap();
    assert!(mapped.is_empty(), "{mapped:?}");
    assert_eq!(read(&mem, LOAD_ADDR, data.len()), data);
}

#[test]
fn the_copy_path_reads_what_the_mapping_path_maps() {
    let data = pattern(40 * PAGE + 1000);
    let file = TempFile::new("same", &elf(PAGE, &data, 0));
    let f = File::open(&file.0).unwrap();
    let (mapping, copying) = (memory(), memory());
    let mut mapped = FileMappings::default();
    let mut none = FileMappings::default();
    let mut reader = MappingReader::new(&f, &file.0, &mapping, &mut mapped).unwrap();
    reader.seek(SeekFrom::Start(PAGE as u64 - 100)).unwrap();
    // Starts 100 bytes before a page boundary in the file, at a guest address 100 bytes
    // before one: a partial first page, whole pages, a partial last page.
    let addr = GuestAddress(LOAD_ADDR - 100);
    mapping
        .read_exact_volatile_from(addr, &mut reader, data.len())
        .unwrap();
    let mut reader = MappingReader::copying(&f, &file.0, &mut none);
    reader.seek(SeekFrom::Start(PAGE as u64 - 100)).unwrap();
    copying
        .read_exact_volatile_from(addr, &mut reader, data.len())
        .unwrap();
    assert_eq!(mapped.bytes(), 40 * PAGE);
    assert!(none.is_empty());
    let len = data.len() + 2 * PAGE;
    assert_eq!(
        read(&mapping, LOAD_ADDR - PAGE as u64, len),
        read(&copying, LOAD_ADDR - PAGE as u64, len)
    );
}

#[test]
fn an_initrd_is_mapped_up_to_its_last_whole_page() {
    let data = pattern(30 * PAGE + 5);
    let file = TempFile::new("initrd", &data);
    let mem = memory();
    let mut mapped = FileMappings::default();
    let kernel = LoadedKernel {
        entry: GuestAddress(LOAD_ADDR),
        protocol: arch::boot::BootProtocol::Linux64,
        setup_header: None,
        kernel_end: 0x40_0000,
    };
    let initrd = load_initrd(&mem, &file.0, &kernel, &mut mapped).unwrap();
    assert_eq!(initrd.size, data.len());
    assert_eq!(
        mapped.ranges(),
        [MappedRange {
            addr: initrd.address,
            len: 30 * PAGE,
            path: file.0.clone(),
        }]
    );
    assert_eq!(read(&mem, initrd.address.raw_value(), data.len()), data);
}

#[test]
fn after_the_swap_guest_memory_survives_its_file_being_overwritten_and_truncated() {
    let (mem, mapped, data, file) = load_partial_segment();
    // The guest writes to one mapped page before the copy and to two after it.
    let mut expected = data.clone();
    let mut write = |page: usize, text: &[u8]| {
        mem.write_slice(text, GuestAddress(LOAD_ADDR + (page * PAGE + 7) as u64))
            .unwrap();
        expected[page * PAGE + 7..page * PAGE + 7 + text.len()].copy_from_slice(text);
    };
    write(3, b"before");
    let detacher = Detacher::prepare(mapped, &mem, open_own_memory().unwrap()).unwrap();
    write(3, b"after");
    write(11, b"later");
    let (bytes, copied_again) = detacher.swap(&mem).unwrap();
    assert_eq!(bytes, 20 * PAGE);
    // Pages 3 and 11; the other 18 are still the file's and were not copied again.
    assert_eq!(copied_again, 2 * PAGE);
    // Overwritten in place, then truncated: a private file mapping would show the new
    // bytes for pages it had not copied, then raise SIGBUS.
    std::fs::write(&file.0, vec![0x55u8; 4 * PAGE]).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file.0)
        .unwrap()
        .set_len(0)
        .unwrap();
    assert_eq!(read(&mem, LOAD_ADDR, data.len()), expected);
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let name = file.0.to_str().unwrap();
    assert!(
        !maps.contains(name),
        "guest memory still maps {name}:\n{maps}"
    );
}

#[test]
fn a_file_truncated_before_the_copy_fails_it_without_a_signal() {
    let (mem, mapped, _data, file) = load_partial_segment();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file.0)
        .unwrap()
        .set_len(0)
        .unwrap();
    let error = Detacher::prepare(mapped, &mem, open_own_memory().unwrap()).unwrap_err();
    assert!(
        matches!(&error, FilePagesError::Read { addr, .. } if *addr == LOAD_ADDR),
        "{error:?}"
    );
    assert!(error.to_string().contains("truncated"), "{error}");
}

#[test]
fn a_file_written_before_the_swap_fails_it() {
    let (mem, mapped, _data, file) = load_partial_segment();
    let detacher = Detacher::prepare(mapped, &mem, open_own_memory().unwrap()).unwrap();
    // Same length, other bytes, in place: the pages the guest has not written show them.
    // (After a pause: file times may be as coarse as the kernel's tick.)
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&file.0)
        .unwrap();
    std::io::Write::write_all(&mut f, &[0x55; 64]).unwrap();
    let error = detacher.swap(&mem).unwrap_err();
    assert!(
        matches!(&error, FilePagesError::Changed { path } if *path == file.0),
        "{error:?}"
    );
}
