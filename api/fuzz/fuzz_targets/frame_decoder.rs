//! Fuzz target: arbitrary bytes into the synchronous frame decoder.
//!
//! Two paths per input. First the whole input as a frame (preamble, CRC, header validated as its
//! opcode's type, payload bounds); whatever is accepted must re-encode to the same preamble and an
//! equal header. Second, the input as `opcode byte ++ header bytes` straight into header
//! validation: a random input almost never carries a matching CRC32C, so without this path the
//! fuzzer would rarely reach rkyv's bytecheck, the part most worth fuzzing.

#![no_main]

use kvtier_wire::{
    AlignedVec, HeaderVisitor, Limits, Opcode, PREAMBLE_LEN, WireHeader, decode_frame,
    decode_header, encode_header, validate_header, visit_header_type,
};
use libfuzzer_sys::fuzz_target;

/// Deserialises an accepted header, archives it again and checks the copy validates to an equal
/// value (rkyv bytes are not canonical, so values are compared, not bytes).
struct Reencode<'a>(Opcode, &'a AlignedVec);

impl HeaderVisitor for Reencode<'_> {
    type Out = ();
    fn visit<T: WireHeader>(self) {
        let value = decode_header::<T>(self.0, self.1).expect("accepted header must deserialise");
        let again = encode_header(&value).expect("a deserialised header must archive");
        let back = decode_header::<T>(self.0, &again).expect("re-archived header must validate");
        assert_eq!(back, value);
    }
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let mut buf = AlignedVec::new();
    if let Ok((pre, payload)) = decode_frame(data, &limits, &mut buf) {
        assert_eq!(pre.encode()[..], data[..PREAMBLE_LEN]);
        assert_eq!(payload.len() as u64, pre.payload_len);
        visit_header_type(pre.opcode, Reencode(pre.opcode, &buf));
    }

    if let Some((&op, header)) = data.split_first()
        && let Some(op) = Opcode::from_u8(op)
    {
        buf.clear();
        buf.extend_from_slice(header);
        if validate_header(op, &buf).is_ok() {
            visit_header_type(op, Reencode(op, &buf));
        }
    }
});
