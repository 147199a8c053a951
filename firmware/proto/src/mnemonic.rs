//! User identities: BIP39 phrases and SLIP-0010 NIST P-256 key derivation.
//!
//! A user's identity is a BIP39 English mnemonic (24 words when we generate one) plus an
//! optional passphrase. The chain is:
//!
//! ```text
//! phrase + passphrase --BIP39 PBKDF2-HMAC-SHA512, 2048 rounds--> 64-byte seed
//! seed --SLIP-0010, curve "Nist256p1 seed"--> master key --m/0'--> user signing key
//! ```
//!
//! Other keys come from the same seed at other paths (m/1' for encryption). Only hardened
//! derivation is offered publicly: every path component must carry `'` (or `h`/`H`), because
//! a non-hardened child plus its parent's chain code leaks the parent private key.
//!
//! [`parse_phrase`] accepts every BIP39 length (12, 15, 18, 21 or 24 words) so existing wallets
//! and the published test vectors work; [`generate_phrase`] always makes 24 words (256 bits).
//! Input is forgiving about case and spacing, strict about words and the checksum, and each
//! failure has its own error so the user can be told exactly what to fix.

use std::borrow::Cow;
use std::fmt;

use bip39::{Language, Mnemonic};
use hmac::{Hmac, Mac};
use p256::elliptic_curve::{Field, PrimeField};
use p256::{FieldBytes, Scalar};
use rand_core::{CryptoRng, RngCore};
use sha2::Sha512;
use zeroize::Zeroize;

use crate::identity::SecretKey;

/// Word counts BIP39 defines.
pub const VALID_WORD_COUNTS: [usize; 5] = [12, 15, 18, 21, 24];
/// Words in a phrase made by [`generate_phrase`].
pub const GENERATED_WORDS: usize = 24;
/// The path of the user's signing key.
pub const USER_KEY_PATH: &str = "m/0'";
/// HMAC key for the SLIP-0010 master key on NIST P-256.
const CURVE_SEED_KEY: &[u8] = b"Nist256p1 seed";
/// Index offset of hardened children.
const HARDENED: u32 = 0x8000_0000;
/// BIP32 depth is one byte.
const MAX_PATH_DEPTH: usize = 255;

/// Why a phrase, path or seed was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MnemonicError {
    #[error("a recovery phrase has 12, 15, 18, 21 or 24 words; this one has {found}")]
    WordCount { found: usize },
    #[error("word {position} ({word:?}) is not in the BIP39 English word list")]
    UnknownWord { position: usize, word: String },
    #[error("the words are all valid but the checksum does not match: a word is wrong or the order is mixed up")]
    BadChecksum,
    #[error("entropy must be 16, 20, 24, 28 or 32 bytes, got {0}")]
    BadEntropy(usize),
    #[error("seed must be 16 to 64 bytes, got {0}")]
    SeedLength(usize),
    #[error("derivation path {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("derivation path {path:?}: component {component:?} is not hardened (add ')")]
    NotHardened { path: String, component: String },
}

/// A checked BIP39 English phrase. `Debug` does not print the words.
#[derive(Clone, PartialEq, Eq)]
pub struct Phrase(Mnemonic);

impl fmt::Debug for Phrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Phrase({} words, redacted)", self.0.word_count())
    }
}

impl Phrase {
    /// The phrase for the given entropy (16..=32 bytes in steps of 4).
    pub fn from_entropy(entropy: &[u8]) -> Result<Self, MnemonicError> {
        Mnemonic::from_entropy_in(Language::English, entropy)
            .map(Self)
            .map_err(|_| MnemonicError::BadEntropy(entropy.len()))
    }

    /// The entropy the phrase encodes.
    pub fn entropy(&self) -> Vec<u8> {
        self.0.to_entropy()
    }

    pub fn word_count(&self) -> usize {
        self.0.word_count()
    }

    pub fn words(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.0.words()
    }

    /// The words joined by single spaces: the text to show the user, once.
    pub fn to_phrase_string(&self) -> String {
        self.0.to_string()
    }
}

/// A new random 24-word phrase from the OS random source.
pub fn generate_phrase() -> String {
    generate_phrase_with(&mut rand_core::OsRng)
}

/// A new random 24-word phrase from `rng` (deterministic tests pass a seeded RNG).
pub fn generate_phrase_with<R: RngCore + CryptoRng>(rng: &mut R) -> String {
    let mut entropy = [0u8; GENERATED_WORDS / 3 * 4];
    rng.fill_bytes(&mut entropy);
    let phrase = Phrase::from_entropy(&entropy);
    entropy.zeroize();
    // Invariant: 32 bytes is a valid BIP39 entropy length, so from_entropy cannot fail.
    phrase
        .expect("32 bytes of entropy always make a 24-word phrase")
        .to_phrase_string()
}

/// Parse a phrase typed by a user.
///
/// Case and whitespace are normalized (any run of spaces, tabs or newlines separates words;
/// `ABANDON` is `abandon`); the text is NFKD-normalized as BIP39 requires. Errors, checked in
/// this order: [`MnemonicError::WordCount`], [`MnemonicError::UnknownWord`] (naming the first
/// unknown word and its 1-based position), [`MnemonicError::BadChecksum`].
pub fn parse_phrase(text: &str) -> Result<Phrase, MnemonicError> {
    let mut normalized = Cow::Owned(text.to_lowercase());
    Mnemonic::normalize_utf8_cow(&mut normalized);
    let words: Vec<&str> = normalized.split_whitespace().collect();
    if !VALID_WORD_COUNTS.contains(&words.len()) {
        return Err(MnemonicError::WordCount { found: words.len() });
    }
    if let Some((i, word)) = words
        .iter()
        .enumerate()
        .find(|(_, w)| Language::English.find_word(w).is_none())
    {
        return Err(MnemonicError::UnknownWord {
            position: i + 1,
            word: (*word).to_string(),
        });
    }
    let joined = words.join(" ");
    Mnemonic::parse_in_normalized(Language::English, &joined)
        .map(Phrase)
        .map_err(|e| match e {
            bip39::Error::BadWordCount(n) => MnemonicError::WordCount { found: n },
            // Word count and words were checked above; what is left is the checksum.
            _ => MnemonicError::BadChecksum,
        })
}

/// The BIP39 seed: PBKDF2-HMAC-SHA512(phrase, "mnemonic" + passphrase, 2048 rounds).
/// The passphrase is NFKD-normalized; an empty passphrase is the BIP39 default.
pub fn seed(phrase: &Phrase, passphrase: &str) -> [u8; 64] {
    phrase.0.to_seed(passphrase)
}

/// The user's signing key: BIP39 seed of `phrase` + `passphrase`, SLIP-0010 P-256 at m/0'.
pub fn user_key(phrase: &str, passphrase: &str) -> Result<SecretKey, MnemonicError> {
    let phrase = parse_phrase(phrase)?;
    let mut seed = seed(&phrase, passphrase);
    let derived = derive_p256(&seed, USER_KEY_PATH);
    seed.zeroize();
    derived.map(|(key, _chain_code)| key)
}

/// SLIP-0010 derivation on NIST P-256 along a hardened-only `path` such as `m/0'` or
/// `m/44h/1'/7H`. `m` alone is the master key. Returns the key and its chain code.
pub fn derive_p256(seed: &[u8], path: &str) -> Result<(SecretKey, [u8; 32]), MnemonicError> {
    let indices = parse_hardened_path(path)?;
    derive_indices(seed, &indices)
}

/// Parse `m(/N')*` into child indices (with the hardened bit set).
fn parse_hardened_path(path: &str) -> Result<Vec<u32>, MnemonicError> {
    let invalid = |reason| MnemonicError::InvalidPath {
        path: path.to_string(),
        reason,
    };
    let mut parts = path.split('/');
    if parts.next() != Some("m") {
        return Err(invalid("must start with \"m\""));
    }
    let mut out = Vec::new();
    for component in parts {
        let digits = match component.strip_suffix(['\'', 'h', 'H']) {
            Some(d) => d,
            None if !component.is_empty() && component.bytes().all(|b| b.is_ascii_digit()) => {
                return Err(MnemonicError::NotHardened {
                    path: path.to_string(),
                    component: component.to_string(),
                })
            }
            None => return Err(invalid("each component is a number followed by '")),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid("each component is a number followed by '"));
        }
        let index: u32 = digits
            .parse()
            .ok()
            .filter(|i| *i < HARDENED)
            .ok_or_else(|| invalid("index must be below 2^31"))?;
        out.push(index | HARDENED);
        if out.len() > MAX_PATH_DEPTH {
            return Err(invalid("deeper than 255 levels"));
        }
    }
    Ok(out)
}

/// An extended private key: scalar and chain code.
struct ExtendedKey {
    key: Scalar,
    chain_code: [u8; 32],
}

impl Drop for ExtendedKey {
    fn drop(&mut self) {
        self.key = Scalar::ZERO;
        self.chain_code.zeroize();
    }
}

/// Derive along raw indices (hardened or not). The public API only passes hardened indices;
/// non-hardened steps exist so the published SLIP-0010 vectors can be checked end to end.
fn derive_indices(seed: &[u8], indices: &[u32]) -> Result<(SecretKey, [u8; 32]), MnemonicError> {
    if !(16..=64).contains(&seed.len()) {
        return Err(MnemonicError::SeedLength(seed.len()));
    }
    let mut ext = master_key(seed);
    for &index in indices {
        ext = child_key(&ext, index);
    }
    let mut bytes: [u8; 32] = ext.key.to_repr().into();
    let key = SecretKey::from_scalar_bytes(&bytes);
    bytes.zeroize();
    // Invariant: master_key and child_key only return non-zero scalars below n, which are
    // exactly the valid P-256 private keys.
    let key = key.expect("derived scalar is non-zero and below the group order");
    Ok((key, ext.chain_code))
}

fn hmac_sha512(key: &[u8], parts: &[&[u8]]) -> [u8; 64] {
    // Invariant: HMAC takes keys of any length, so new_from_slice cannot fail.
    let mut mac = Hmac::<Sha512>::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// IL as a scalar if 0 < IL < n.
fn valid_scalar(il: &[u8; 32]) -> Option<Scalar> {
    let scalar: Option<Scalar> = Scalar::from_repr(FieldBytes::from(*il)).into();
    scalar.filter(|s| !bool::from(s.is_zero()))
}

fn split(mut i: [u8; 64]) -> ([u8; 32], [u8; 32]) {
    let mut il = [0u8; 32];
    let mut ir = [0u8; 32];
    il.copy_from_slice(&i[..32]);
    ir.copy_from_slice(&i[32..]);
    i.zeroize();
    (il, ir)
}

/// SLIP-0010 master key: I = HMAC-SHA512("Nist256p1 seed", S); if IL is 0 or >= n, S := I.
fn master_key(seed: &[u8]) -> ExtendedKey {
    let mut i = hmac_sha512(CURVE_SEED_KEY, &[seed]);
    loop {
        let (mut il, ir) = split(i);
        if let Some(key) = valid_scalar(&il) {
            il.zeroize();
            return ExtendedKey {
                key,
                chain_code: ir,
            };
        }
        let mut data = [0u8; 64];
        data[..32].copy_from_slice(&il);
        data[32..].copy_from_slice(&ir);
        i = hmac_sha512(CURVE_SEED_KEY, &[&data]);
        data.zeroize();
        il.zeroize();
    }
}

/// SLIP-0010 CKDpriv with its retry rule: if IL >= n or the child key is 0, recompute with
/// I = HMAC-SHA512(c_par, 0x01 || IR || ser32(i)).
fn child_key(parent: &ExtendedKey, index: u32) -> ExtendedKey {
    let index_bytes = index.to_be_bytes();
    let mut i = if index >= HARDENED {
        let mut k: [u8; 32] = parent.key.to_repr().into();
        let i = hmac_sha512(&parent.chain_code, &[&[0u8], &k, &index_bytes]);
        k.zeroize();
        i
    } else {
        let mut k: [u8; 32] = parent.key.to_repr().into();
        let public = SecretKey::from_scalar_bytes(&k).map(|s| s.public());
        k.zeroize();
        // Invariant: an ExtendedKey always holds a valid non-zero scalar below n.
        let public = public.expect("extended key holds a valid scalar");
        hmac_sha512(&parent.chain_code, &[public.as_bytes(), &index_bytes])
    };
    loop {
        let (mut il, ir) = split(i);
        if let Some(tweak) = valid_scalar(&il) {
            let key = tweak + parent.key;
            if !bool::from(key.is_zero()) {
                il.zeroize();
                return ExtendedKey {
                    key,
                    chain_code: ir,
                };
            }
        }
        il.zeroize();
        i = hmac_sha512(&parent.chain_code, &[&[1u8], &ir, &index_bytes]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Trezor python-mnemonic vectors.json, English, passphrase "TREZOR":
    /// (entropy, mnemonic, seed).
    const BIP39_VECTORS: &[(&str, &str, &str)] = &[
        (
            "00000000000000000000000000000000",
            "abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon about",
            "c55257c360c07c72029aebc1b53c05ed0362ada38ead3e3e9efa3708e53495531f09a6987599d18264c1e1c92f2cf141630c7a3c4ab7c81b2f001698e7463b04",
        ),
        (
            "7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f",
            "legal winner thank year wave sausage worth useful legal winner thank yellow",
            "2e8905819b8723fe2c1d161860e5ee1830318dbf49a83bd451cfb8440c28bd6fa457fe1296106559a3c80937a1c1069be3a3a5bd381ee6260e8d9739fce1f607",
        ),
        (
            "ffffffffffffffffffffffffffffffff",
            "zoo zoo zoo zoo zoo zoo zoo zoo zoo zoo zoo wrong",
            "ac27495480225222079d7be181583751e86f571027b0497b5b5d11218e0a8a13332572917f0f8e5a589620c6f15b11c61dee327651a14c34e18231052e48c069",
        ),
        (
            "000000000000000000000000000000000000000000000000",
            "abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon agent",
            "035895f2f481b1b0f01fcf8c289c794660b289981a78f8106447707fdd9666ca06da5a9a565181599b79f53b844d8a71dd9f439c52a3d7b3e8a79c906ac845fa",
        ),
        (
            "0000000000000000000000000000000000000000000000000000000000000000",
            "abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon art",
            "bda85446c68413707090a52022edd26a1c9462295029f2e60cd7c4f2bbd3097170af7a4d73245cafa9c3cca8d561a7c3de6f5d4a10be8ed2a5e608d68f92fcc8",
        ),
        (
            "7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f",
            "legal winner thank year wave sausage worth useful legal winner thank year wave sausage worth useful legal winner thank year wave sausage worth title",
            "bc09fca1804f7e69da93c2f2028eb238c227f2e9dda30cd63699232578480a4021b146ad717fbb7e451ce9eb835f43620bf5c514db0f8add49f5d121449d3e87",
        ),
        (
            "8080808080808080808080808080808080808080808080808080808080808080",
            "letter advice cage absurd amount doctor acoustic avoid letter advice cage absurd amount doctor acoustic avoid letter advice cage absurd amount doctor acoustic bless",
            "c0c519bd0e91a2ed54357d9d1ebef6f5af218a153624cf4f2da911a0ed8f7a09e2ef61af0aca007096df430022f7a2b6fb91661a9589097069720d015e4e982f",
        ),
        (
            "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
            "zoo zoo zoo zoo zoo zoo zoo zoo zoo zoo zoo zoo zoo zoo zoo zoo zoo zoo zoo zoo zoo zoo zoo vote",
            "dd48c104698c30cfe2b6142103248622fb7bb0ff692eebb00089b32d22484e1613912f0a5b694407be899ffd31ed3992c456cdf60f5d4564b8ba3f05a69890ad",
        ),
        (
            "9e885d952ad362caeb4efe34a8e91bd2",
            "ozone drill grab fiber curtain grace pudding thank cruise elder eight picnic",
            "274ddc525802f7c828d8ef7ddbcdc5304e87ac3535913611fbbfa986d0c9e5476c91689f9c8a54fd55bd38606aa6a8595ad213d4c9c9f9aca3fb217069a41028",
        ),
        (
            "68a79eaca2324873eacc50cb9c6eca8cc68ea5d936f98787c60c7ebc74e6ce7c",
            "hamster diagram private dutch cause delay private meat slide toddler razor book happy fancy gospel tennis maple dilemma loan word shrug inflict delay length",
            "64c87cde7e12ecf6704ab95bb1408bef047c22db4cc7491c4271d170a1b213d20b385bc1588d9c7b38f1b39d415665b8a9030c9ec653d75e65f847d8fc1fc440",
        ),
        (
            "9f6a2878b2520799a44ef18bc7df394e7061a224d2c33cd015b157d746869863",
            "panda eyebrow bullet gorilla call smoke muffin taste mesh discover soft ostrich alcohol speed nation flash devote level hobby quick inner drive ghost inside",
            "72be8e052fc4919d2adf28d5306b5474b0069df35b02303de8c1729c9538dbb6fc2d731d5f832193cd9fb6aeecbc469594a70e3dd50811b5067f3b88b28c3e8d",
        ),
        (
            "066dca1a2bb7e8a1db2832148ce9933eea0f3ac9548d793112d9a95c9407efad",
            "all hour make first leader extend hole alien behind guard gospel lava path output census museum junior mass reopen famous sing advance salt reform",
            "26e975ec644423f4a4c4f4215ef09b4bd7ef924e85d1d17c4cf3f136c2863cf6df0a475045652c57eb5fb41513ca2a2d67722b77e954b4b3fc11f7590449191d",
        ),
        (
            "f585c11aec520db57dd353c69554b21a89b20fb0650966fa0a9d6f74fd989d8f",
            "void come effort suffer camp survey warrior heavy shoot primary clutch crush open amazing screen patrol group space point ten exist slush involve unfold",
            "01f5bced59dec48e362f2c45b5de68b9fd6c92c6634f44d6d40aab69056506f0e35524a518034ddc1192e1dacd32c1ed3eaa3c3b131c88ed8e7e54c49a5d0998",
        ),
    ];

    #[test]
    fn bip39_trezor_vectors_entropy_phrase_and_seed() {
        for (entropy, words, expected_seed) in BIP39_VECTORS {
            let phrase = Phrase::from_entropy(&unhex(entropy)).unwrap();
            assert_eq!(phrase.to_phrase_string(), *words);
            let parsed = parse_phrase(words).unwrap();
            assert_eq!(hex(&parsed.entropy()), *entropy);
            assert_eq!(hex(&seed(&parsed, "TREZOR")), *expected_seed, "{words}");
        }
    }

    #[test]
    fn generated_phrases_have_24_valid_words_and_differ() {
        let a = generate_phrase();
        let b = generate_phrase();
        assert_ne!(a, b);
        let parsed = parse_phrase(&a).unwrap();
        assert_eq!(parsed.word_count(), 24);
        assert_eq!(parsed.entropy().len(), 32);
    }

    #[test]
    fn parse_is_forgiving_about_case_and_spacing() {
        let messy = "  ABANDON abandon\tabandon\nabandon abandon  abandon abandon abandon abandon abandon abandon About ";
        let p = parse_phrase(messy).unwrap();
        assert_eq!(p.entropy(), vec![0u8; 16]);
        assert!(!format!("{p:?}").contains("abandon"));
    }

    #[test]
    fn parse_errors_are_distinct() {
        let twenty_three = ["abandon"; 23].join(" ");
        assert_eq!(
            parse_phrase(&twenty_three).unwrap_err(),
            MnemonicError::WordCount { found: 23 }
        );
        assert_eq!(
            parse_phrase("").unwrap_err(),
            MnemonicError::WordCount { found: 0 }
        );
        let typo = "abandon abandon abandon abandom abandon abandon abandon abandon abandon abandon abandon about";
        let err = parse_phrase(typo).unwrap_err();
        assert_eq!(
            err,
            MnemonicError::UnknownWord {
                position: 4,
                word: "abandom".into()
            }
        );
        assert!(err.to_string().contains("\"abandom\""), "{err}");
        let swapped = "about abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon";
        assert_eq!(
            parse_phrase(swapped).unwrap_err(),
            MnemonicError::BadChecksum
        );
    }

    struct Step {
        path: &'static [u32],
        chain_code: &'static str,
        private: &'static str,
        public: &'static str,
    }

    const H: u32 = HARDENED;

    fn check_steps(seed_hex: &str, steps: &[Step]) {
        for step in steps {
            let (key, chain_code) = derive_indices(&unhex(seed_hex), step.path).unwrap();
            assert_eq!(hex(&chain_code), step.chain_code, "{:?}", step.path);
            assert_eq!(hex(&key.scalar_bytes()), step.private, "{:?}", step.path);
            assert_eq!(hex(key.public().as_bytes()), step.public, "{:?}", step.path);
        }
    }

    /// SLIP-0010, "Test vector 1 for nist256p1".
    #[test]
    fn slip10_nist256p1_vector_1() {
        check_steps(
            "000102030405060708090a0b0c0d0e0f",
            &[
                Step {
                    path: &[],
                    chain_code: "beeb672fe4621673f722f38529c07392fecaa61015c80c34f29ce8b41b3cb6ea",
                    private: "612091aaa12e22dd2abef664f8a01a82cae99ad7441b7ef8110424915c268bc2",
                    public: "0266874dc6ade47b3ecd096745ca09bcd29638dd52c2c12117b11ed3e458cfa9e8",
                },
                Step {
                    path: &[H],
                    chain_code: "3460cea53e6a6bb5fb391eeef3237ffd8724bf0a40e94943c98b83825342ee11",
                    private: "6939694369114c67917a182c59ddb8cafc3004e63ca5d3b84403ba8613debc0c",
                    public: "0384610f5ecffe8fda089363a41f56a5c7ffc1d81b59a612d0d649b2d22355590c",
                },
                Step {
                    path: &[H, 1],
                    chain_code: "4187afff1aafa8445010097fb99d23aee9f599450c7bd140b6826ac22ba21d0c",
                    private: "284e9d38d07d21e4e281b645089a94f4cf5a5a81369acf151a1c3a57f18b2129",
                    public: "03526c63f8d0b4bbbf9c80df553fe66742df4676b241dabefdef67733e070f6844",
                },
                Step {
                    path: &[H, 1, 2 | H],
                    chain_code: "98c7514f562e64e74170cc3cf304ee1ce54d6b6da4f880f313e8204c2a185318",
                    private: "694596e8a54f252c960eb771a3c41e7e32496d03b954aeb90f61635b8e092aa7",
                    public: "0359cf160040778a4b14c5f4d7b76e327ccc8c4a6086dd9451b7482b5a4972dda0",
                },
                Step {
                    path: &[H, 1, 2 | H, 2],
                    chain_code: "ba96f776a5c3907d7fd48bde5620ee374d4acfd540378476019eab70790c63a0",
                    private: "5996c37fd3dd2679039b23ed6f70b506c6b56b3cb5e424681fb0fa64caf82aaa",
                    public: "029f871f4cb9e1c97f9f4de9ccd0d4a2f2a171110c61178f84430062230833ff20",
                },
                Step {
                    path: &[H, 1, 2 | H, 2, 1_000_000_000],
                    chain_code: "b9b7b82d326bb9cb5b5b121066feea4eb93d5241103c9e7a18aad40f1dde8059",
                    private: "21c4f269ef0a5fd1badf47eeacebeeaa3de22eb8e5b0adcd0f27dd99d34d0119",
                    public: "02216cd26d31147f72427a453c443ed2cde8a1e53c9cc44e5ddf739725413fe3f4",
                },
            ],
        );
    }

    /// SLIP-0010, "Test vector 2 for nist256p1".
    #[test]
    fn slip10_nist256p1_vector_2() {
        check_steps(
            "fffcf9f6f3f0edeae7e4e1dedbd8d5d2cfccc9c6c3c0bdbab7b4b1aeaba8a5a29f9c999693908d8a8784817e7b7875726f6c696663605d5a5754514e4b484542",
            &[
                Step {
                    path: &[],
                    chain_code: "96cd4465a9644e31528eda3592aa35eb39a9527769ce1855beafc1b81055e75d",
                    private: "eaa31c2e46ca2962227cf21d73a7ef0ce8b31c756897521eb6c7b39796633357",
                    public: "02c9e16154474b3ed5b38218bb0463e008f89ee03e62d22fdcc8014beab25b48fa",
                },
                Step {
                    path: &[0],
                    chain_code: "84e9c258bb8557a40e0d041115b376dd55eda99c0042ce29e81ebe4efed9b86a",
                    private: "d7d065f63a62624888500cdb4f88b6d59c2927fee9e6d0cdff9cad555884df6e",
                    public: "039b6df4bece7b6c81e2adfeea4bcf5c8c8a6e40ea7ffa3cf6e8494c61a1fc82cc",
                },
                Step {
                    path: &[0, 2_147_483_647 | H],
                    chain_code: "f235b2bc5c04606ca9c30027a84f353acf4e4683edbd11f635d0dcc1cd106ea6",
                    private: "96d2ec9316746a75e7793684ed01e3d51194d81a42a3276858a5b7376d4b94b9",
                    public: "02f89c5deb1cae4fedc9905f98ae6cbf6cbab120d8cb85d5bd9a91a72f4c068c76",
                },
                Step {
                    path: &[0, 2_147_483_647 | H, 1],
                    chain_code: "7c0b833106235e452eba79d2bdd58d4086e663bc8cc55e9773d2b5eeda313f3b",
                    private: "974f9096ea6873a915910e82b29d7c338542ccde39d2064d1cc228f371542bbc",
                    public: "03abe0ad54c97c1d654c1852dfdc32d6d3e487e75fa16f0fd6304b9ceae4220c64",
                },
                Step {
                    path: &[0, 2_147_483_647 | H, 1, 2_147_483_646 | H],
                    chain_code: "5794e616eadaf33413aa309318a26ee0fd5163b70466de7a4512fd4b1a5c9e6a",
                    private: "da29649bbfaff095cd43819eda9a7be74236539a29094cd8336b07ed8d4eff63",
                    public: "03cb8cb067d248691808cd6b5a5a06b48e34ebac4d965cba33e6dc46fe13d9b933",
                },
                Step {
                    path: &[0, 2_147_483_647 | H, 1, 2_147_483_646 | H, 2],
                    chain_code: "3bfb29ee8ac4484f09db09c2079b520ea5616df7820f071a20320366fbe226a7",
                    private: "bb0a77ba01cc31d77205d51d08bd313b979a71ef4de9b062f8958297e746bd67",
                    public: "020ee02e18967237cf62672983b253ee62fa4dd431f8243bfeccdf39dbe181387f",
                },
            ],
        );
    }

    /// SLIP-0010, "Test derivation retry for nist256p1": m/28578' hits IL >= n once.
    #[test]
    fn slip10_nist256p1_derivation_retry() {
        check_steps(
            "000102030405060708090a0b0c0d0e0f",
            &[
                Step {
                    path: &[28578 | H],
                    chain_code: "e94c8ebe30c2250a14713212f6449b20f3329105ea15b652ca5bdfc68f6c65c2",
                    private: "06f0db126f023755d0b8d86d4591718a5210dd8d024e3e14b6159d63f53aa669",
                    public: "02519b5554a4872e8c9c1c847115363051ec43e93400e030ba3c36b52a3e70a5b7",
                },
                Step {
                    path: &[28578 | H, 33941],
                    chain_code: "9e87fe95031f14736774cd82f25fd885065cb7c358c1edf813c72af535e83071",
                    private: "092154eed4af83e078ff9b84322015aefe5769e31270f62c3f66c33888335f3a",
                    public: "0235bfee614c0d5b2cae260000bb1d0d84b270099ad790022c1ae0b2e782efe120",
                },
            ],
        );
    }

    /// SLIP-0010, "Test seed retry for nist256p1": the first master IL is >= n.
    #[test]
    fn slip10_nist256p1_seed_retry() {
        check_steps(
            "a7305bc8df8d0951f0cb224c0e95d7707cbdf2c6ce7e8d481fec69c7ff5e9446",
            &[Step {
                path: &[],
                chain_code: "7762f9729fed06121fd13f326884c82f59aa95c57ac492ce8c9654e60efd130c",
                private: "3b8c18469a4634517d6d0b65448f8e6c62091b45540a1743c5846be55d47d88f",
                public: "0383619fadcde31063d8c5cb00dbfe1713f3e6fa169d8541a798752a1c1ca0cb20",
            }],
        );
    }

    #[test]
    fn public_path_api_matches_vectors_and_is_hardened_only() {
        let seed = unhex("000102030405060708090a0b0c0d0e0f");
        for path in ["m/0'", "m/0h", "m/0H"] {
            let (key, cc) = derive_p256(&seed, path).unwrap();
            assert_eq!(
                hex(&key.scalar_bytes()),
                "6939694369114c67917a182c59ddb8cafc3004e63ca5d3b84403ba8613debc0c"
            );
            assert_eq!(
                hex(&cc),
                "3460cea53e6a6bb5fb391eeef3237ffd8724bf0a40e94943c98b83825342ee11"
            );
        }
        let (key, _) = derive_p256(&seed, "m/28578'").unwrap();
        assert_eq!(
            hex(&key.scalar_bytes()),
            "06f0db126f023755d0b8d86d4591718a5210dd8d024e3e14b6159d63f53aa669"
        );
        let (master, _) = derive_p256(&seed, "m").unwrap();
        assert_eq!(
            hex(&master.scalar_bytes()),
            "612091aaa12e22dd2abef664f8a01a82cae99ad7441b7ef8110424915c268bc2"
        );
        assert!(matches!(
            derive_p256(&seed, "m/0'/1"),
            Err(MnemonicError::NotHardened { component, .. }) if component == "1"
        ));
        for bad in [
            "",
            "0'",
            "m/",
            "m//0'",
            "m/-1'",
            "m/2147483648'",
            "m/x'",
            "m/0''",
            "M/0'",
        ] {
            assert!(
                matches!(
                    derive_p256(&seed, bad),
                    Err(MnemonicError::InvalidPath { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(derive_p256(&seed, "m/2147483647'").is_ok());
        assert_eq!(
            derive_p256(&[0u8; 8], "m/0'").unwrap_err(),
            MnemonicError::SeedLength(8)
        );
    }

    #[test]
    fn user_key_is_m0h_of_the_bip39_seed() {
        let words = BIP39_VECTORS[4].1;
        let key = user_key(words, "TREZOR").unwrap();
        let seed = seed(&parse_phrase(words).unwrap(), "TREZOR");
        let (expected, _) = derive_p256(&seed, "m/0'").unwrap();
        assert_eq!(key.public(), expected.public());
        // A different passphrase is a different identity.
        assert_ne!(user_key(words, "").unwrap().public(), key.public());
        assert!(matches!(
            user_key("abandon", ""),
            Err(MnemonicError::WordCount { found: 1 })
        ));
    }
}
