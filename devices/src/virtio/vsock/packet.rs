//! The virtio-vsock packet header (virtio 1.2, 5.10.6).

use vm_memory::ByteValued;

/// `struct virtio_vsock_hdr`, little endian.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C, packed)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type (1 = stream).
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes of the receiver's data the sender has consumed.
    pub fwd_cnt: u32,
}

// SAFETY: Header is #[repr(C, packed)] and made of integers only: any bit pattern is valid and
// there is no padding (44 bytes).
unsafe impl ByteValued for Header {}

/// Size of [`Header`] on the wire.
pub const HEADER_LEN: usize = 44;
/// The stream socket type.
pub const TYPE_STREAM: u16 = 1;
/// Connection request.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection reset (refused or closed).
pub const OP_RST: u16 = 3;
/// One or both directions closed.
pub const OP_SHUTDOWN: u16 = 4;
/// Data.
pub const OP_RW: u16 = 5;
/// Credit announcement.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Credit request.
pub const OP_CREDIT_REQUEST: u16 = 7;
/// SHUTDOWN flag: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_44_bytes() {
        assert_eq!(std::mem::size_of::<Header>(), HEADER_LEN);
    }
}
