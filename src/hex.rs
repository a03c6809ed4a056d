//! Lower-case hex, the one spelling of bytes in tollgate's files, reports and logs.

/// `bytes` as lower-case hex.
pub fn encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// Hex (either case) to bytes. The error never repeats the input: it may be a secret.
pub fn decode(text: &str) -> Result<Vec<u8>, String> {
    if !text.len().is_multiple_of(2) {
        return Err(format!("expected an even number of hex digits, got {}", text.len()));
    }
    if let Some(at) = text.bytes().position(|b| !b.is_ascii_hexdigit()) {
        return Err(format!("character {} is not a hex digit", at + 1));
    }
    Ok(text.as_bytes().chunks(2).map(|pair| (digit(pair[0]) << 4) | digit(pair[1])).collect())
}

fn digit(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => c - b'A' + 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_never_echoes_bad_input() {
        let bytes = [0x00, 0x7f, 0x80, 0xff, 0x1a];
        assert_eq!(encode(&bytes), "007f80ff1a");
        assert_eq!(decode("007F80ff1A").unwrap(), bytes);
        assert!(decode("abc").is_err());
        let err = decode("zz").unwrap_err();
        assert!(!err.contains("zz"), "{err}");
    }
}
