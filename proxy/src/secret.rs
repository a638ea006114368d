//! Comparing a secret a client presents (an API token, a password) with the configured one.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Whether `presented` equals `expected`, without telling a timing attacker how much of it
/// matched or how long the secret is. Both are reduced to SHA-256 digests, which are compared
/// in constant time: the only length-dependent work is hashing each input once, which depends
/// on the presented length (known to the caller) and on the secret's length only in 64-byte
/// blocks, never on their contents. A slice compare returns early on the first difference and
/// on a length mismatch.
pub fn secret_eq(expected: &[u8], presented: &[u8]) -> bool {
    let expected = Sha256::digest(expected);
    let presented = Sha256::digest(presented);
    expected.as_slice().ct_eq(presented.as_slice()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_secrets_match_and_any_difference_does_not() {
        assert!(secret_eq(b"s3cret-token", b"s3cret-token"));
        assert!(secret_eq(b"", b""));
        assert!(!secret_eq(b"s3cret-token", b"s3cret-tokeN"));
        assert!(!secret_eq(b"s3cret-token", b"s3cret-token "));
        assert!(!secret_eq(b"s3cret-token", b"s3cret"));
        assert!(!secret_eq(b"s3cret-token", b""));
    }
}
