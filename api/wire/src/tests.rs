//! Unit tests of the frame layer: header round trips and one test per rule violation, on the
//! synchronous paths. The async read and write paths are in `io_tests.rs`.

use kvtier_cache::{ChunkKey, ChunkMeta, Fidelity};

use super::*;

pub(super) fn meta(fidelity: u8, parent: Option<u128>) -> ChunkMetaWire {
    ChunkMetaWire {
        layout: 0xdead_beef_0000_0001,
        tokens: 256,
        depth: 3,
        parent,
        codec: 7,
        fidelity,
        lossy_codec: if fidelity == FIDELITY_LOSSY { 3 } else { 0 },
        error_bound: if fidelity == FIDELITY_LOSSY {
            0.01
        } else {
            0.0
        },
        raw_len: 32 << 20,
    }
}

/// Frames `h`, decodes the frame from memory, checks every preamble field and that the header
/// deserialises to an equal value.
fn round_trip<T: WireHeader>(h: T) {
    let payload_len = if T::OPCODE.max_payload(&Limits::default()) > 0 {
        5
    } else {
        0
    };
    let mut frame = frame_head(T::OPCODE, 77, FLAG_NO_REPLY, &h, payload_len).unwrap();
    frame.extend_from_slice(&b"hello"[..payload_len as usize]);
    let mut buf = AlignedVec::new();
    let (pre, payload) = decode_frame(&frame, &Limits::default(), &mut buf).unwrap();
    assert_eq!(pre.opcode, T::OPCODE);
    assert_eq!(
        (pre.request_id, pre.flags, pre.payload_len),
        (77, FLAG_NO_REPLY, payload_len)
    );
    assert_eq!(
        pre.header_len as usize,
        frame.len() - PREAMBLE_LEN - payload_len as usize
    );
    assert_eq!(payload.len() as u64, payload_len);
    assert_eq!(decode_header::<T>(T::OPCODE, &buf).unwrap(), h);
}

#[test]
fn every_header_round_trips() {
    let keys = vec![1u128, u128::MAX, 0x0123_4567_89ab_cdef_0011_2233_4455_6677];
    round_trip(HelloHeader {
        protocol_version: VERSION,
        auth_token: "s3cret".into(),
        tenant: "acme".into(),
        client_name: "vllm-worker-0".into(),
    });
    round_trip(HelloOkHeader {
        server_id: "kvtier-1".into(),
        protocol_version: VERSION,
        max_header_len: 65536,
        max_payload_len: 1 << 30,
        max_keys: 512,
        max_in_flight: 64,
    });
    round_trip(PutHeader {
        key: u128::MAX - 5,
        meta: meta(FIDELITY_LOSSY, Some(42)),
    });
    round_trip(OkHeader {});
    round_trip(GetHeader {
        keys: keys.clone(),
        accept_lossy: true,
    });
    round_trip(GetOkHeader {
        entries: vec![
            GetEntry {
                found: true,
                meta: meta(FIDELITY_EXACT, None),
                len: 5,
                offset: 0,
            },
            GetEntry::default(),
        ],
    });
    round_trip(LookupHeader {
        layout_fingerprint: 9,
        salt: Some("lora-7".into()),
        chunk_tokens: 256,
    });
    round_trip(LookupHeader {
        layout_fingerprint: 9,
        salt: None,
        chunk_tokens: 16,
    });
    round_trip(LookupOkHeader {
        hit_chunks: 2,
        hit_tokens: 512,
        hits: vec![
            LookupHit {
                key: 1,
                tiers: 0b0011,
                fidelity: FIDELITY_EXACT,
            },
            LookupHit {
                key: 2,
                tiers: 0b0100,
                fidelity: FIDELITY_LOSSY,
            },
        ],
    });
    round_trip(LeaseHeader {
        keys: keys.clone(),
        ttl_ms: 30_000,
    });
    round_trip(LeaseOkHeader {
        lease_ids: vec![5, 0, 6],
    });
    round_trip(ReleaseHeader {
        lease_ids: vec![5, 6],
    });
    round_trip(DeleteHeader { keys: keys.clone() });
    round_trip(DeleteOkHeader { removed: 2 });
    round_trip(StatsHeader {});
    round_trip(StatsOkHeader {
        json: r#"{"chunks":3}"#.into(),
    });
    round_trip(ShmRegisterHeader {
        name: "kvtier-shm-1".into(),
        len: 1 << 30,
    });
    round_trip(ShmRegisterOkHeader { region_id: 3 });
    round_trip(ShmPutHeader {
        region_id: 3,
        offset: 4096,
        len: 1 << 20,
        key: 99,
        meta: meta(FIDELITY_LOSSLESS, Some(98)),
    });
    round_trip(ShmGetHeader {
        region_id: 3,
        offset: 0,
        capacity: 1 << 24,
        keys: keys.clone(),
        accept_lossy: false,
    });
    round_trip(MapArenasHeader {});
    round_trip(MapArenasOkHeader {
        arenas: vec![
            ArenaInfo {
                arena_id: 0,
                len: 1 << 30,
            },
            ArenaInfo {
                arena_id: 1,
                len: 7,
            },
        ],
    });
    round_trip(GetLocatedHeader {
        keys,
        lease_ttl_ms: 1000,
        accept_lossy: true,
    });
    round_trip(GetLocatedOkHeader {
        entries: vec![
            LocatedEntry {
                found: true,
                arena_id: 1,
                offset: 8192,
                len: 4096,
                lease_id: 11,
                meta: meta(FIDELITY_EXACT, Some(1)),
            },
            LocatedEntry::default(),
        ],
    });
    round_trip(ErrorHeader {
        code: ErrorCode::TierFull as u16,
        message: "full".into(),
    });
}

#[test]
fn opcode_table_is_consistent() {
    for op in Opcode::ALL {
        assert_eq!(Opcode::from_u8(op as u8), Some(op));
        match op.response() {
            Some(resp) => assert!(!op.is_response() && resp.is_response(), "{op:?}"),
            None => assert!(op.is_response(), "{op:?}"),
        }
    }
    assert_eq!(Opcode::from_u8(0), None);
    assert_eq!(Opcode::from_u8(0x80), None);
    for c in ErrorCode::ALL {
        assert_eq!(ErrorCode::try_from(u16::from(c)), Ok(c));
    }
    assert_eq!(ErrorCode::try_from(999), Err(999));
}

#[test]
fn preamble_layout_and_round_trip() {
    let p = Preamble {
        opcode: Opcode::Put,
        flags: FLAG_NO_REPLY,
        request_id: 0x0102_0304_0506_0708,
        header_len: 0x1234,
        payload_len: 0x0a0b_0c0d,
        header_crc: 0xcafe_f00d,
    };
    let b = p.encode();
    assert_eq!(&b[..6], b"KVTW\x01\x02");
    assert_eq!(b[6..8], [1, 0]);
    assert_eq!(b[8..16], [8, 7, 6, 5, 4, 3, 2, 1]);
    assert_eq!(b[16..20], [0x34, 0x12, 0, 0]);
    assert_eq!(b[20..28], [0x0d, 0x0c, 0x0b, 0x0a, 0, 0, 0, 0]);
    assert_eq!(b[28..32], [0x0d, 0xf0, 0xfe, 0xca]);
    assert_eq!(Preamble::decode(&b, &Limits::default()).unwrap(), p);
}

fn valid_preamble() -> [u8; PREAMBLE_LEN] {
    Preamble {
        opcode: Opcode::Put,
        flags: 0,
        request_id: 1,
        header_len: 16,
        payload_len: 100,
        header_crc: 0,
    }
    .encode()
}

fn decode_err(b: [u8; PREAMBLE_LEN]) -> WireError {
    Preamble::decode(&b, &Limits::default()).unwrap_err()
}

#[test]
fn preamble_violations_have_their_own_errors() {
    let mut b = valid_preamble();
    b[0] = b'X';
    assert!(matches!(decode_err(b), WireError::BadMagic));

    let mut b = valid_preamble();
    b[4] = 2;
    assert!(matches!(decode_err(b), WireError::UnsupportedVersion(2)));

    let mut b = valid_preamble();
    b[5] = 0x42;
    assert!(matches!(decode_err(b), WireError::UnknownOpcode(0x42)));

    let mut b = valid_preamble();
    b[6..8].copy_from_slice(&0x8001u16.to_le_bytes());
    assert!(matches!(decode_err(b), WireError::UnknownFlags(0x8000)));
    // A server may refuse even known flags.
    let strict = Limits {
        allowed_flags: 0,
        ..Limits::default()
    };
    b[6..8].copy_from_slice(&FLAG_NO_REPLY.to_le_bytes());
    assert!(matches!(
        Preamble::decode(&b, &strict),
        Err(WireError::UnknownFlags(1))
    ));

    let mut b = valid_preamble();
    b[16..20].copy_from_slice(&(64u32 << 10).to_le_bytes());
    assert!(
        Preamble::decode(&b, &Limits::default()).is_ok(),
        "the limit itself is allowed"
    );
    b[16..20].copy_from_slice(&((64u32 << 10) + 1).to_le_bytes());
    assert!(matches!(
        decode_err(b),
        WireError::HeaderTooLarge {
            len: 65537,
            max: 65536
        }
    ));

    let max = (1u64 << 30) + (64 << 10);
    let mut b = valid_preamble();
    b[20..28].copy_from_slice(&max.to_le_bytes());
    assert!(Preamble::decode(&b, &Limits::default()).is_ok());
    b[20..28].copy_from_slice(&(max + 1).to_le_bytes());
    assert!(
        matches!(decode_err(b), WireError::PayloadTooLarge { len, max: m } if len == max + 1 && m == max)
    );
}

#[test]
fn payload_caps_depend_on_the_opcode() {
    let limits = Limits::default();
    let pre = |op: Opcode, len: u64| {
        let mut b = valid_preamble();
        b[5] = op as u8;
        b[20..28].copy_from_slice(&len.to_le_bytes());
        Preamble::decode(&b, &limits)
    };
    assert!(matches!(
        pre(Opcode::Stats, 1),
        Err(WireError::PayloadTooLarge { len: 1, max: 0 })
    ));
    assert!(matches!(
        pre(Opcode::Error, 1),
        Err(WireError::PayloadTooLarge { .. })
    ));
    assert!(pre(Opcode::Lookup, 4 << 20).is_ok());
    assert!(matches!(
        pre(Opcode::Lookup, (4 << 20) + 4),
        Err(WireError::PayloadTooLarge { .. })
    ));
    assert!(pre(Opcode::GetOk, 1 << 30).is_ok());
}

#[test]
fn bad_crc_and_garbage_headers_are_rejected() {
    let mut buf = AlignedVec::new();
    let mut frame =
        frame_head(Opcode::Delete, 1, 0, &DeleteHeader { keys: vec![1, 2] }, 0).unwrap();
    frame[PREAMBLE_LEN] ^= 0x40;
    assert!(matches!(
        decode_frame(&frame, &Limits::default(), &mut buf),
        Err(WireError::HeaderChecksum)
    ));

    // Garbage with a correct CRC gets past the checksum and must fail rkyv validation: the
    // root's relative pointer points outside the buffer.
    let garbage = [0xffu8; 24];
    let pre = Preamble {
        opcode: Opcode::Delete,
        flags: 0,
        request_id: 1,
        header_len: garbage.len() as u32,
        payload_len: 0,
        header_crc: crc32c::crc32c(&garbage),
    };
    let mut frame = pre.encode().to_vec();
    frame.extend_from_slice(&garbage);
    let err = decode_frame(&frame, &Limits::default(), &mut buf).unwrap_err();
    assert!(matches!(err, WireError::InvalidHeader(_)), "{err:?}");

    // An empty header is no `DeleteHeader` either.
    buf.clear();
    assert!(matches!(
        access_header::<DeleteHeader>(Opcode::Delete, &buf),
        Err(WireError::InvalidHeader(_))
    ));
}

#[test]
fn header_must_match_its_opcode() {
    let bytes = encode_header(&DeleteHeader { keys: vec![1] }).unwrap();
    assert!(access_header::<DeleteHeader>(Opcode::Delete, &bytes).is_ok());
    // Same layout, wrong opcode: rejected by type, not by luck of the bytes.
    let err = access_header::<GetHeader>(Opcode::Delete, &bytes).unwrap_err();
    assert!(matches!(err, WireError::InvalidHeader(_)));
    let err = frame_head(Opcode::Get, 1, 0, &DeleteHeader { keys: vec![1] }, 0).unwrap_err();
    assert!(matches!(err, WireError::InvalidHeader(_)));
}

#[test]
fn semantic_checks_reject_bad_contents() {
    let inval = |r: Result<(), WireError>| matches!(r, Err(WireError::InvalidHeader(_)));
    let too_many = GetHeader {
        keys: vec![7; MAX_KEYS + 1],
        accept_lossy: false,
    };
    assert!(inval(validate_header(
        Opcode::Get,
        &encode_header(&too_many).unwrap()
    )));
    let at_cap = GetHeader {
        keys: vec![7; MAX_KEYS],
        accept_lossy: false,
    };
    assert!(validate_header(Opcode::Get, &encode_header(&at_cap).unwrap()).is_ok());

    let bad_tag = PutHeader {
        key: 1,
        meta: meta(3, None),
    };
    assert!(inval(validate_header(
        Opcode::Put,
        &encode_header(&bad_tag).unwrap()
    )));
    let mut nan = meta(FIDELITY_LOSSY, None);
    nan.error_bound = f32::NAN;
    let bad_bound = ShmPutHeader {
        region_id: 0,
        offset: 0,
        len: 0,
        key: 1,
        meta: nan,
    };
    assert!(inval(validate_header(
        Opcode::ShmPut,
        &encode_header(&bad_bound).unwrap()
    )));

    let mismatch = LookupOkHeader {
        hit_chunks: 3,
        hit_tokens: 0,
        hits: vec![],
    };
    assert!(inval(validate_header(
        Opcode::LookupOk,
        &encode_header(&mismatch).unwrap()
    )));
    let zero_chunk = LookupHeader {
        layout_fingerprint: 1,
        salt: None,
        chunk_tokens: 0,
    };
    assert!(inval(validate_header(
        Opcode::Lookup,
        &encode_header(&zero_chunk).unwrap()
    )));
}

#[test]
fn max_keys_fits_every_request_and_response() {
    let limits = Limits::default();
    let n = limits.max_keys();
    assert!((256..MAX_KEYS).contains(&n), "max_keys {n}");
    let fits = |op: Opcode, bytes: AlignedVec| {
        assert!(
            bytes.len() <= limits.max_header_len as usize,
            "{op:?}: {} bytes",
            bytes.len()
        );
        validate_header(op, &bytes).unwrap();
    };
    let full = GetEntry {
        found: true,
        meta: meta(FIDELITY_LOSSY, Some(u128::MAX)),
        len: 1,
        offset: 2,
    };
    fits(
        Opcode::Get,
        encode_header(&GetHeader {
            keys: vec![u128::MAX; n],
            accept_lossy: true,
        })
        .unwrap(),
    );
    fits(
        Opcode::GetOk,
        encode_header(&GetOkHeader {
            entries: vec![full; n],
        })
        .unwrap(),
    );
    let located = LocatedEntry {
        found: true,
        meta: full.meta,
        ..LocatedEntry::default()
    };
    fits(
        Opcode::GetLocatedOk,
        encode_header(&GetLocatedOkHeader {
            entries: vec![located; n],
        })
        .unwrap(),
    );
    let hit = LookupHit {
        key: 1,
        tiers: 1,
        fidelity: 0,
    };
    let lookup = LookupOkHeader {
        hit_chunks: n as u32,
        hit_tokens: 1,
        hits: vec![hit; n],
    };
    fits(Opcode::LookupOk, encode_header(&lookup).unwrap());
    fits(
        Opcode::LeaseOk,
        encode_header(&LeaseOkHeader {
            lease_ids: vec![u64::MAX; n],
        })
        .unwrap(),
    );
    // And the bound is tight to within one entry: twice as many would not fit.
    let over = encode_header(&GetOkHeader {
        entries: vec![full; 2 * n],
    })
    .unwrap();
    assert!(over.len() > limits.max_header_len as usize);
}

#[test]
fn chunk_meta_converts_both_ways() {
    let metas = [
        ChunkMeta::raw(5, 6, 256, 0, 1 << 20),
        ChunkMeta {
            parent: Some(ChunkKey(77)),
            fidelity: Fidelity::Lossy {
                codec: 2,
                error_bound: 0.05,
            },
            codec: 2,
            ..ChunkMeta::raw(5, 6, 128, 4, 999)
        },
        ChunkMeta {
            fidelity: Fidelity::Lossless,
            ..ChunkMeta::raw(5, 6, 1, 1, 1)
        },
    ];
    for m in metas {
        let put = PutHeader {
            key: 1,
            meta: ChunkMetaWire::from_meta(&m),
        };
        let bytes = encode_header(&put).unwrap();
        let a = access_header::<PutHeader>(Opcode::Put, &bytes).unwrap();
        assert_eq!(a.meta.to_meta(5).unwrap(), m);
        assert_eq!(a.key.to_native(), 1);
    }
}

#[test]
fn error_frames_carry_code_and_bounded_message() {
    let long = "é".repeat(1000); // 2000 bytes; the cut must land on a char boundary
    let frame = error_frame(9, ErrorCode::NotFound, &long);
    let mut buf = AlignedVec::new();
    let (pre, payload) = decode_frame(&frame, &Limits::default(), &mut buf).unwrap();
    assert_eq!(
        (pre.opcode, pre.request_id, payload.len()),
        (Opcode::Error, 9, 0)
    );
    let h = access_header::<ErrorHeader>(Opcode::Error, &buf).unwrap();
    assert_eq!(
        ErrorCode::from_u16(h.code.to_native()),
        Some(ErrorCode::NotFound)
    );
    assert_eq!(h.message.as_str(), "é".repeat(512));
    assert_eq!(WireError::HeaderChecksum.code(), ErrorCode::BadFrame);
    assert_eq!(
        WireError::PayloadTooLarge { len: 1, max: 0 }.code(),
        ErrorCode::TooLarge
    );
}

#[test]
fn lookup_tokens_travel_as_le_u32() {
    let toks = vec![0, 1, 0xdead_beef, u32::MAX];
    let p = tokens_to_payload(&toks);
    assert_eq!(p[8..12], [0xef, 0xbe, 0xad, 0xde]);
    assert_eq!(tokens_from_payload(&p).unwrap(), toks);
    assert!(tokens_from_payload(&p[..7]).is_err());
}
