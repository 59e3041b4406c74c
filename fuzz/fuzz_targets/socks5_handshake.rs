//! The SOCKS5 handshake (ztunnel's 15080): the client's bytes, greeting then request, through
//! the parsers exactly as the listener feeds them (only the bytes each asks for). Beyond not
//! panicking: a parser asks only for more than it holds and never for more than the largest
//! message, and a message parses the same whether or not bytes follow it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztunnel::proxy::socks5::{Parse, Socks5Error, parse_greeting, parse_request};

/// 5, count, 255 methods.
const MAX_GREETING: usize = 2 + 255;
/// Head, name length, a 255-byte name, port.
const MAX_REQUEST: usize = 4 + 1 + 255 + 2;

/// Feeds `stream` to `parse` as the I/O does; returns the outcome and the bytes it consumed.
fn drive<T: PartialEq + std::fmt::Debug>(
    stream: &[u8],
    parse: fn(&[u8]) -> Result<Parse<T>, Socks5Error>,
    max: usize,
) -> Option<(T, usize)> {
    let mut have = 0;
    loop {
        match parse(&stream[..have]) {
            Ok(Parse::Need(len)) => {
                assert!(len > have, "asked for {len} bytes holding {have}");
                assert!(
                    len <= max,
                    "asked for {len} bytes, more than a message can be"
                );
                if len > stream.len() {
                    return None; // the client would have to send more
                }
                have = len;
            }
            Ok(Parse::Done(message, len)) => {
                assert_eq!(len, have, "a message longer than the bytes read");
                // Whatever follows (the payload) changes nothing.
                match parse(stream) {
                    Ok(Parse::Done(again, again_len)) => {
                        assert_eq!((&again, again_len), (&message, len));
                    }
                    other => panic!("{message:?} with bytes behind it: {other:?}"),
                }
                return Some((message, len));
            }
            Err(e) => {
                // Refusals are answered with a well-formed SOCKS5 message, or not at all.
                if let Some(reply) = e.reply() {
                    assert!(reply.len() == 2 || reply.len() == 10, "{e}: {reply:?}");
                    assert_eq!(reply[0], 5);
                }
                // The same bytes with more behind them are refused too.
                assert!(parse(stream).is_err(), "{e} only without trailing bytes");
                return None;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(((), used)) = drive(data, parse_greeting, MAX_GREETING) else {
        return;
    };
    let _ = drive(&data[used..], parse_request, MAX_REQUEST);
    // The request parser on its own, from the first byte: any bytes at all.
    let _ = drive(data, parse_request, MAX_REQUEST);
});
