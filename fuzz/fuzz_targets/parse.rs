//! Fuzzes the request parser as a connection drives it: whatever the bytes,
//! no panic, progress on every answer, bounded buffering, and parsed keys
//! and data that respect the protocol's rules.
//!
//! Run: `cargo +nightly fuzz run parse fuzz/corpus/parse` (see README).
#![no_main]

use dynacache::protocol::{Command, KEY_MAX_LEN, Limits, Parsed, parse};
use libfuzzer_sys::fuzz_target;

fn check_key(key: &[u8]) {
    assert!(!key.is_empty() && key.len() <= KEY_MAX_LEN, "key length {}", key.len());
    assert!(!key.contains(&b' ') && !key.contains(&b'\n'), "key {key:?}");
}

fn check(cmd: &Command<'_>) {
    match cmd {
        Command::Get { keys, .. } => keys.iter().for_each(check_key),
        Command::Store { key, .. }
        | Command::Delete { key, .. }
        | Command::Touch { key, .. }
        | Command::Arith { key, .. } => check_key(key),
        Command::Meta(meta) => {
            // As sent (base64 with `b`), and as used.
            assert!(!meta.key_token.is_empty() && !meta.key_token.contains(&b' '));
            assert!(!meta.key.is_empty() && meta.key.len() <= KEY_MAX_LEN);
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    // A small item limit, so the fuzzer reaches the too-large path.
    let limits = Limits {
        item_size_max: 512,
        ..Limits::default()
    };
    let mut rest = data;
    loop {
        match parse(rest, &limits) {
            Parsed::Request(cmd, len) => {
                assert!(len > 0 && len <= rest.len());
                check(&cmd);
                if let Command::Store { data, key, .. } = &cmd {
                    assert!(key.len() + data.len() <= limits.item_size_max);
                }
                if let Command::Meta(meta) = &cmd {
                    assert!(meta.key.len() + meta.data.len() <= limits.item_size_max);
                }
                // Streaming: one byte less is never a different answer.
                assert_eq!(parse(&rest[..len - 1], &limits), Parsed::Incomplete);
                rest = &rest[len..];
            }
            Parsed::Invalid { len, .. } => {
                assert!(len > 0 && len <= rest.len());
                rest = &rest[len..];
            }
            Parsed::TooLarge { key, len, discard, .. } => {
                assert!(len > 0 && len <= rest.len());
                check_key(key);
                // Refused only when it would not fit.
                assert!(key.len() as u64 + discard - 2 > limits.item_size_max as u64);
                let skip = (discard as usize).min(rest.len() - len);
                rest = &rest[len + skip..];
            }
            Parsed::Incomplete => {
                // Bounded buffering: waiting for more is only allowed while
                // what is held fits one request.
                match rest.iter().position(|&b| b == b'\n') {
                    None => assert!(rest.len() <= limits.max_get_line),
                    Some(end) => assert!(rest.len() - end - 1 <= limits.item_size_max + 2),
                }
                break;
            }
            Parsed::LineTooLong => {
                assert!(rest.len() > limits.max_line);
                break;
            }
        }
    }
});
