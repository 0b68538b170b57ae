//! Command-line parsing: `tg.<key>=<value>` words; other words are ignored.

/// The guest command line, split on spaces.
#[derive(Debug, Clone, Copy)]
pub struct Params<'a> {
    line: &'a [u8],
}

impl<'a> Params<'a> {
    /// Wraps a command line.
    pub fn new(line: &'a [u8]) -> Self {
        Self { line }
    }

    /// Whitespace-separated words.
    pub fn words(&self) -> impl Iterator<Item = &'a [u8]> {
        self.line
            .split(|b| matches!(b, b' ' | b'\t' | b'\n'))
            .filter(|w| !w.is_empty())
    }

    /// Values of every `<name>=<value>` word, in order.
    pub fn values(&self, name: &'a str) -> impl Iterator<Item = &'a [u8]> {
        self.words()
            .filter_map(move |w| w.strip_prefix(name.as_bytes())?.strip_prefix(b"="))
    }

    /// The value of the last `tg.<key>=<value>` word as a string.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        let value = self
            .words()
            .filter_map(|w| {
                w.strip_prefix(b"tg.")?
                    .strip_prefix(key.as_bytes())?
                    .strip_prefix(b"=")
            })
            .last()?;
        core::str::from_utf8(value).ok()
    }

    /// `tg.<key>` as a number; `Err` carries the key when the value is not a number.
    pub fn u64_or(&self, key: &'static str, default: u64) -> Result<u64, &'static str> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => parse_u64(v).ok_or(key),
        }
    }

    /// `tg.<key>` as an optional number.
    pub fn u64_opt(&self, key: &'static str) -> Result<Option<u64>, &'static str> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => parse_u64(v).map(Some).ok_or(key),
        }
    }
}

/// Parses decimal or `0x` hexadecimal.
pub fn parse_u64(s: &str) -> Option<u64> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else {
        s.parse().ok()
    }
}

/// Parses a size with an optional K/M/G suffix (as Linux's `memparse`).
pub fn parse_size(s: &str) -> Option<u64> {
    let (num, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    parse_u64(num)?.checked_mul(1 << shift)
}

/// One `virtio_mmio.device=<size>@<addr>:<irq>[:<id>]` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    /// Size of the register window.
    pub size: u64,
    /// Base address.
    pub addr: u64,
    /// Interrupt line.
    pub irq: u64,
}

/// Parses the value of a `virtio_mmio.device=` word.
pub fn parse_virtio_mmio(value: &[u8]) -> Option<VirtioMmioDevice> {
    let s = core::str::from_utf8(value).ok()?;
    let (size, rest) = s.split_once('@')?;
    let mut parts = rest.split(':');
    let addr = parse_u64(parts.next()?)?;
    let irq = parse_u64(parts.next()?)?;
    Some(VirtioMmioDevice {
        size: parse_size(size)?,
        addr,
        irq,
    })
}
