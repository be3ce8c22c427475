//! Property tests: the decoder never panics on arbitrary or mutated input, every frame it accepts
//! re-encodes to the same preamble and an equal header, and arbitrary valid frames survive a
//! write/read round trip over a pipe with tiny buffers.

use proptest::prelude::*;

use super::tests::meta;
use super::*;

/// Checks what the decoder accepted: the preamble re-encodes byte for byte, and the header
/// deserialises, re-archives and validates again to an equal value. rkyv bytes are not
/// canonical (padding and pointer placement are free), so header *bytes* are compared through
/// the value, not directly.
struct Reencode<'a>(Opcode, &'a AlignedVec);

impl HeaderVisitor for Reencode<'_> {
    type Out = ();
    fn visit<T: WireHeader>(self) {
        let value = decode_header::<T>(self.0, self.1).expect("accepted header deserialises");
        let again = encode_header(&value).unwrap();
        assert_eq!(decode_header::<T>(self.0, &again).unwrap(), value);
    }
}

fn check_decoder(bytes: &[u8]) {
    let limits = Limits::default();
    let mut buf = AlignedVec::new();
    if let Ok((pre, payload)) = decode_frame(bytes, &limits, &mut buf) {
        assert_eq!(pre.encode()[..], bytes[..PREAMBLE_LEN]);
        assert_eq!(
            &buf[..],
            &bytes[PREAMBLE_LEN..PREAMBLE_LEN + pre.header_len as usize]
        );
        assert_eq!(payload.len() as u64, pre.payload_len);
        visit_header_type(pre.opcode, Reencode(pre.opcode, &buf));
    }
}

/// A preamble that passes every check, with `header` and a correct CRC behind it, so the bytes
/// reach rkyv validation instead of dying at the magic.
fn framed_garbage(op: Opcode, header: &[u8], payload: &[u8]) -> Vec<u8> {
    let pre = Preamble {
        opcode: op,
        flags: 0,
        request_id: 1,
        header_len: header.len() as u32,
        payload_len: payload
            .len()
            .min(op.max_payload(&Limits::default()) as usize) as u64,
        header_crc: crc32c::crc32c(header),
    };
    let mut out = pre.encode().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(payload);
    out
}

fn any_opcode() -> impl Strategy<Value = Opcode> {
    proptest::sample::select(Opcode::ALL.to_vec())
}

fn any_meta() -> impl Strategy<Value = ChunkMetaWire> {
    (
        any::<u64>(),
        any::<u32>(),
        any::<Option<u128>>(),
        0u8..3,
        any::<u64>(),
    )
        .prop_map(
            |(layout, tokens, parent, fidelity, raw_len)| ChunkMetaWire {
                layout,
                tokens,
                raw_len,
                ..meta(fidelity, parent)
            },
        )
}

/// One valid frame: opcode, header bytes (as a ready frame head), payload.
fn any_frame() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    let keys = proptest::collection::vec(any::<u128>(), 0..64);
    let payload = proptest::collection::vec(any::<u8>(), 0..3000);
    let flags = prop_oneof![Just(0u16), Just(FLAG_NO_REPLY)];
    let frames = prop_oneof![
        (any::<u128>(), any_meta(), payload.clone())
            .prop_map(|(key, meta, p)| (encode_any(&PutHeader { key, meta }, p.len()), p)),
        (keys.clone(), any::<bool>()).prop_map(|(keys, accept_lossy)| {
            (encode_any(&GetHeader { keys, accept_lossy }, 0), vec![])
        }),
        (
            proptest::collection::vec((any::<bool>(), any_meta(), 0u64..100), 0..20),
            payload.clone()
        )
            .prop_map(|(es, p)| {
                let entries = es
                    .into_iter()
                    .map(|(found, meta, len)| GetEntry {
                        found,
                        meta,
                        len,
                        offset: len / 2,
                    })
                    .collect();
                (encode_any(&GetOkHeader { entries }, p.len()), p)
            }),
        (
            any::<u64>(),
            proptest::option::of(".{0,40}"),
            1u32..=1024,
            payload
        )
            .prop_map(|(fp, salt, ct, p)| {
                let h = LookupHeader {
                    layout_fingerprint: fp,
                    salt,
                    chunk_tokens: ct,
                };
                let p = p[..p.len() / 4 * 4].to_vec();
                (encode_any(&h, p.len()), p)
            }),
        (".{0,64}", ".{0,64}", any::<u8>()).prop_map(|(tenant, client_name, v)| {
            let h = HelloHeader {
                protocol_version: v,
                auth_token: "t".into(),
                tenant,
                client_name,
            };
            (encode_any(&h, 0), vec![])
        }),
        (keys, any::<u64>())
            .prop_map(|(keys, ttl_ms)| (encode_any(&LeaseHeader { keys, ttl_ms }, 0), vec![])),
        (any::<u16>(), ".{0,200}").prop_map(|(code, message)| {
            (encode_any(&ErrorHeader { code, message }, 0), vec![])
        }),
    ];
    (frames, any::<u64>(), flags).prop_map(|((mut head, payload), id, flags)| {
        // Patch the id and flags into the preamble: they are outside the CRC.
        head[8..16].copy_from_slice(&id.to_le_bytes());
        head[6..8].copy_from_slice(&flags.to_le_bytes());
        (head, payload)
    })
}

fn encode_any<T: WireHeader>(h: &T, payload_len: usize) -> Vec<u8> {
    frame_head(T::OPCODE, 0, 0, h, payload_len as u64).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn decoder_never_panics_on_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        magic in any::<bool>(),
    ) {
        let mut bytes = bytes;
        // Half the cases start with the magic and version so the later checks get exercised.
        if magic && bytes.len() >= 5 {
            bytes[..4].copy_from_slice(&MAGIC);
            bytes[4] = VERSION;
        }
        check_decoder(&bytes);
    }

    #[test]
    fn decoder_never_panics_on_garbage_headers(
        op in any_opcode(),
        header in proptest::collection::vec(any::<u8>(), 0..400),
        payload in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        check_decoder(&framed_garbage(op, &header, &payload));
    }

    #[test]
    fn decoder_never_panics_on_mutated_frames(
        (head, payload) in any_frame(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        fix_crc in any::<bool>(),
    ) {
        let mut frame = head;
        frame.extend_from_slice(&payload);
        for (at, x) in flips {
            let i = at.index(frame.len());
            frame[i] ^= x.max(1);
        }
        if fix_crc && frame.len() >= PREAMBLE_LEN {
            // Recompute the CRC so a mutated header reaches rkyv validation.
            let hlen = u32::from_le_bytes(frame[16..20].try_into().unwrap()) as usize;
            if let Some(h) = frame.get(PREAMBLE_LEN..PREAMBLE_LEN.saturating_add(hlen)) {
                let crc = crc32c::crc32c(h);
                frame[28..32].copy_from_slice(&crc.to_le_bytes());
            }
        }
        check_decoder(&frame);
    }

    #[test]
    fn valid_frames_round_trip_through_a_pipe((head, payload) in any_frame(), cap in 1usize..97) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let (mut a, mut b) = tokio::io::duplex(cap);
            let (h, p) = (head.clone(), payload.clone());
            let writer = tokio::spawn(async move {
                // The payload in up to three slices, as the server sends several chunks.
                let cut = [p.len() / 3, p.len() / 2];
                let parts: [&[u8]; 3] = [&p[..cut[0]], &p[cut[0]..cut[1]], &p[cut[1]..]];
                write_frame(&mut a, &h, &parts).await.unwrap();
            });
            let mut buf = AlignedVec::new();
            let limits = Limits::default();
            let stall = std::time::Duration::from_secs(5);
            let pre = read_frame_head(&mut b, &limits, stall, &mut buf).await.unwrap().unwrap();
            prop_assert_eq!(&pre.encode()[..], &head[..PREAMBLE_LEN]);
            prop_assert_eq!(&buf[..], &head[PREAMBLE_LEN..]);
            validate_header(pre.opcode, &buf).unwrap();
            let mut got = vec![0u8; pre.payload_len as usize];
            read_payload_into(&mut b, &mut got, stall).await.unwrap();
            prop_assert_eq!(got, payload);
            writer.await.unwrap();
            prop_assert!(read_frame_head(&mut b, &limits, stall, &mut buf).await.unwrap().is_none());
            Ok(())
        })?;
    }
}
