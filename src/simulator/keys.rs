//! SSH key pairs as Nova handles them: fingerprints of imported public keys and fake but
//! well-formed generated key pairs.
//!
//! Nova's fingerprint is the MD5 of the decoded public key blob, as colon-separated hex
//! (what `ssh-keygen -l -E md5` prints). No MD5 crate is a dependency, so a small
//! implementation is here; it is used for nothing but fingerprints.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rand::Rng;

/// Why a public key was refused (Nova: "Keypair data is invalid: ...").
pub(crate) const INVALID_KEY: &str = "Keypair data is invalid: failed to generate fingerprint";

/// The MD5 fingerprint of an OpenSSH public key line (`<type> <base64> [comment]`).
/// Only `ssh-rsa`, `ssh-ed25519` and `ecdsa-*` keys are accepted, like the provider.
pub(crate) fn fingerprint(public_key: &str) -> Result<String, &'static str> {
    let mut parts = public_key.split_whitespace();
    let kind = parts.next().ok_or(INVALID_KEY)?;
    if !(kind == "ssh-rsa" || kind == "ssh-ed25519" || kind.starts_with("ecdsa-")) {
        return Err(INVALID_KEY);
    }
    if !(public_key.starts_with("ssh-rsa ")
        || public_key.starts_with("ssh-ed25519 ")
        || public_key.starts_with("ecdsa-"))
    {
        return Err(INVALID_KEY);
    }
    let blob = parts
        .next()
        .and_then(|b| STANDARD.decode(b).ok())
        .filter(|b| !b.is_empty())
        .ok_or(INVALID_KEY)?;
    Ok(colon_hex(&md5(&blob)))
}

/// A generated key pair: (public key line, private key PEM, fingerprint).
pub(crate) fn generate() -> (String, String, String) {
    let mut rng = rand::rng();
    // RSA-2048 modulus: top bit set, odd.
    let mut modulus = [0u8; 256];
    rng.fill(&mut modulus[..]);
    modulus[0] |= 0x80;
    modulus[255] |= 0x01;

    let mut blob = Vec::with_capacity(280);
    push_string(&mut blob, b"ssh-rsa");
    push_string(&mut blob, &[0x01, 0x00, 0x01]);
    let mut mpint = Vec::with_capacity(257);
    mpint.push(0);
    mpint.extend_from_slice(&modulus);
    push_string(&mut blob, &mpint);
    let public_key = format!("ssh-rsa {} Generated-by-Nova", STANDARD.encode(&blob));

    // A PKCS#1 RSAPrivateKey-shaped DER: the real modulus and exponent, then random
    // bytes where the private numbers would be. Well-formed PEM, useless as a key.
    let mut der = vec![
        0x30, 0x82, 0x04, 0xa2, 0x02, 0x01, 0x00, 0x02, 0x82, 0x01, 0x01, 0x00,
    ];
    der.extend_from_slice(&modulus);
    der.extend_from_slice(&[0x02, 0x03, 0x01, 0x00, 0x01]);
    let mut rest = vec![0u8; 1190 - der.len()];
    rng.fill(&mut rest[..]);
    der.extend_from_slice(&rest);
    let encoded = STANDARD.encode(&der);
    let mut private_key = String::from("-----BEGIN RSA PRIVATE KEY-----\n");
    for line in encoded.as_bytes().chunks(64) {
        private_key.push_str(&String::from_utf8_lossy(line));
        private_key.push('\n');
    }
    private_key.push_str("-----END RSA PRIVATE KEY-----\n");

    let fp = colon_hex(&md5(&blob));
    (public_key, private_key, fp)
}

fn push_string(out: &mut Vec<u8>, data: &[u8]) {
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
}

fn colon_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

const SHIFTS: [u32; 64] = [
    7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 5, 9, 14, 20, 5, 9, 14, 20, 5, 9,
    14, 20, 5, 9, 14, 20, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 6, 10, 15,
    21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21,
];

const K: [u32; 64] = [
    0xd76aa478, 0xe8c7b756, 0x242070db, 0xc1bdceee, 0xf57c0faf, 0x4787c62a, 0xa8304613, 0xfd469501,
    0x698098d8, 0x8b44f7af, 0xffff5bb1, 0x895cd7be, 0x6b901122, 0xfd987193, 0xa679438e, 0x49b40821,
    0xf61e2562, 0xc040b340, 0x265e5a51, 0xe9b6c7aa, 0xd62f105d, 0x02441453, 0xd8a1e681, 0xe7d3fbc8,
    0x21e1cde6, 0xc33707d6, 0xf4d50d87, 0x455a14ed, 0xa9e3e905, 0xfcefa3f8, 0x676f02d9, 0x8d2a4c8a,
    0xfffa3942, 0x8771f681, 0x6d9d6122, 0xfde5380c, 0xa4beea44, 0x4bdecfa9, 0xf6bb4b60, 0xbebfbc70,
    0x289b7ec6, 0xeaa127fa, 0xd4ef3085, 0x04881d05, 0xd9d4d039, 0xe6db99e5, 0x1fa27cf8, 0xc4ac5665,
    0xf4292244, 0x432aff97, 0xab9423a7, 0xfc93a039, 0x655b59c3, 0x8f0ccc92, 0xffeff47d, 0x85845dd1,
    0x6fa87e4f, 0xfe2ce6e0, 0xa3014314, 0x4e0811a1, 0xf7537e82, 0xbd3af235, 0x2ad7d2bb, 0xeb86d391,
];

/// MD5 (RFC 1321).
fn md5(input: &[u8]) -> [u8; 16] {
    let mut state: [u32; 4] = [0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476];
    let bit_len = (input.len() as u64).wrapping_mul(8);
    let mut msg = input.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_le_bytes());

    for chunk in msg.chunks_exact(64) {
        let mut m = [0u32; 16];
        for (word, bytes) in m.iter_mut().zip(chunk.chunks_exact(4)) {
            *word = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        }
        let [mut a, mut b, mut c, mut d] = state;
        for i in 0..64 {
            let (f, g) = match i / 16 {
                0 => ((b & c) | (!b & d), i),
                1 => ((d & b) | (!d & c), (5 * i + 1) % 16),
                2 => (b ^ c ^ d, (3 * i + 5) % 16),
                _ => (c ^ (b | !d), (7 * i) % 16),
            };
            let f = f.wrapping_add(a).wrapping_add(K[i]).wrapping_add(m[g]);
            a = d;
            d = c;
            c = b;
            b = b.wrapping_add(f.rotate_left(SHIFTS[i]));
        }
        state[0] = state[0].wrapping_add(a);
        state[1] = state[1].wrapping_add(b);
        state[2] = state[2].wrapping_add(c);
        state[3] = state[3].wrapping_add(d);
    }

    let mut out = [0u8; 16];
    for (dst, word) in out.chunks_exact_mut(4).zip(state) {
        dst.copy_from_slice(&word.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn md5_known_vectors() {
        assert_eq!(hex(&md5(b"")), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(hex(&md5(b"abc")), "900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(
            hex(&md5(b"The quick brown fox jumps over the lazy dog")),
            "9e107d9d372bb6826bd81d3542a419d6"
        );
        let long = vec![b'a'; 1000];
        assert_eq!(hex(&md5(&long)), "cabe45dcc9ae5b66ba86600cca6b8ba8");
    }

    #[test]
    fn generated_keys_are_consistent() {
        let (public, private, fp) = generate();
        assert!(public.starts_with("ssh-rsa AAAAB3NzaC1yc2E"));
        assert!(public.ends_with(" Generated-by-Nova"));
        assert_eq!(fingerprint(&public).unwrap(), fp);
        assert_eq!(fp.len(), 47);
        assert!(private.starts_with("-----BEGIN RSA PRIVATE KEY-----\nMIIEog"));
        assert!(private.ends_with("-----END RSA PRIVATE KEY-----\n"));
    }

    #[test]
    fn rejects_bad_public_keys() {
        assert!(fingerprint("ssh-dss AAAA").is_err());
        assert!(fingerprint("ssh-rsa").is_err());
        assert!(fingerprint("ssh-rsa !!!notbase64").is_err());
        assert!(fingerprint(" ssh-rsa AAAA").is_err());
        assert!(fingerprint("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 me@host").is_ok());
        assert!(fingerprint("ecdsa-sha2-nistp256 AAAAE2VjZHNh").is_ok());
    }
}
