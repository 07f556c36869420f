//! Credentials: bearer tokens (stored and compared as SHA-256 digests, in constant time) and
//! GitHub-style `X-Hub-Signature-256` HMAC signatures.

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub use gorp_types::types::sha256_hex;

/// A new random bearer token (256 bits, hex).
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}

/// Whether `token` hashes to `stored_hex`, compared in constant time.
pub fn token_matches_hash(token: &str, stored_hex: &str) -> bool {
    sha256_hex(token)
        .as_bytes()
        .ct_eq(stored_hex.as_bytes())
        .into()
}

/// Whether `token` is one of `tokens`. Every candidate is compared (no early exit), each as a
/// fixed-length digest in constant time, so timing reveals neither which token nor how much
/// of it matched.
pub fn token_in(token: &str, tokens: &[String]) -> bool {
    let digest = Sha256::digest(token.as_bytes());
    let mut found = subtle::Choice::from(0);
    for t in tokens {
        found |= Sha256::digest(t.as_bytes())
            .as_slice()
            .ct_eq(digest.as_slice());
    }
    found.into()
}

/// Verifies an `X-Hub-Signature-256` header (`sha256=<hex>`) over the raw body.
pub fn verify_github_signature(secret: &str, body: &[u8], header: &str) -> bool {
    let Some(hex_sig) = header.trim().strip_prefix("sha256=") else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig) else {
        return false;
    };
    let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

/// The `X-Hub-Signature-256` value for `body` (for clients and tests).
pub fn github_signature(secret: &str, body: &[u8]) -> String {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GitHub's published example: secret "It's a Secret to Everybody", payload
    /// "Hello, World!".
    #[test]
    fn github_documented_signature_verifies_and_one_bit_flip_fails() {
        let secret = "It's a Secret to Everybody";
        let body = b"Hello, World!";
        let want = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(github_signature(secret, body), want);
        assert!(verify_github_signature(secret, body, want));
        let mut flipped = body.to_vec();
        flipped[0] ^= 1;
        assert!(!verify_github_signature(secret, &flipped, want));
        let mut bad_sig = want.to_string();
        bad_sig.replace_range(want.len() - 1.., "6");
        assert!(!verify_github_signature(secret, body, &bad_sig));
        assert!(!verify_github_signature(secret, body, "sha1=abc"));
        assert!(!verify_github_signature(secret, body, "sha256=zz"));
    }

    #[test]
    fn tokens_compare_by_digest() {
        let t = new_token();
        assert_eq!(t.len(), 64);
        assert!(token_matches_hash(&t, &sha256_hex(&t)));
        assert!(!token_matches_hash("other", &sha256_hex(&t)));
        let list = vec!["a".repeat(20), t.clone()];
        assert!(token_in(&t, &list));
        assert!(!token_in("nope", &list));
        assert!(!token_in("", &[]));
    }
}
