//! TLS 1.3 configurations authenticated by node keys, not by certificate authorities.
//!
//! Every node presents a self-signed X.509 certificate made from its own P-256 node key
//! ([`self_signed_cert`]). The certificate is only a container for the key: who a peer *is* is
//! decided by comparing the key inside the certificate with the key we expect (the client pins
//! the server) or by reading it out after the handshake (the server learns who the client is,
//! [`peer_key`]). Names, issuers and validity dates are not checked: there is no CA, and a node
//! whose clock is wrong must still be able to talk to its peers to learn the time.
//!
//! What *is* checked, in every configuration:
//! - TLS 1.3 only, with the `ring` provider passed explicitly (the process-wide default provider
//!   is never consulted).
//! - The TLS 1.3 `CertificateVerify` signature, via [`rustls::crypto::verify_tls13_signature`]:
//!   this is what proves the peer holds the private key of the certificate it sent. TLS 1.2
//!   signatures are always refused.
//! - For node certificates: exactly one certificate, DER that parses completely, a P-256
//!   `SubjectPublicKeyInfo`, a valid self-signature, and the scheme `ecdsa_secp256r1_sha256`.
//!
//! Configurations:
//! - [`TlsIdentity::server_config`] / [`TlsIdentity::client_config`]: node to node, mutual
//!   authentication, ALPN [`ALPN_PEER`], no session resumption (every connection runs the full
//!   handshake, so the verifiers always run and [`peer_key`] always has a certificate to read).
//! - [`TlsIdentity::receptor_server_config`]: the HTTPS receptor; no client certificates.
//! - [`cli_client_config`]: for command-line clients that talk to a receptor, pinned if the
//!   node key is known, otherwise accepting any certificate (the caller must then rely on the
//!   signed response envelope, not on TLS, for the node's identity).

use std::fmt;
use std::sync::Arc;

use borg_proto::identity::{PublicKey, SecretKey};
use p256::pkcs8::EncodePrivateKey;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::NoServerSessionStorage;
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, ServerConfig, SignatureScheme,
};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};

/// ALPN protocol id of node-to-node connections. Both sides require it, so a peer connection
/// can never be confused with an HTTPS connection to a receptor (which does not offer it).
pub const ALPN_PEER: &[u8] = b"borg-peer/1";

/// ALPN protocol id of the links of cell `cell`'s tree: [`ALPN_PEER`] for the base cell,
/// `borg-peer/1/<cell>` for every other. Every tree listener of a node accepts them all and
/// hands each connection to the cell it names, so one mapped or relayed port serves all cells.
pub fn alpn_of(cell: &str) -> Vec<u8> {
    if cell == borg_proto::dna::PEER_TREE_NET.name {
        ALPN_PEER.to_vec()
    } else {
        format!("borg-peer/1/{cell}").into_bytes()
    }
}

/// The cell an ALPN id names (see [`alpn_of`]); `None` for anything else.
pub fn cell_of_alpn(alpn: &[u8]) -> Option<&'static str> {
    if alpn == ALPN_PEER {
        return Some(borg_proto::dna::PEER_TREE_NET.name);
    }
    let name = alpn.strip_prefix(b"borg-peer/1/")?;
    borg_proto::dna::CELLS
        .iter()
        .find(|c| c.name.as_bytes() == name && c.name != borg_proto::dna::PEER_TREE_NET.name)
        .map(|c| c.name)
}

/// ALPN protocol id of reachability probes: one short exchange on a fresh connection that
/// never becomes a tree link (docs/NAT.md).
pub const ALPN_PROBE: &[u8] = b"borg-probe/1";

/// Common name in node certificates. Informational only; nothing checks it.
pub const CERT_COMMON_NAME: &str = "borg-node";

/// The one TLS signature scheme a P-256 node key can produce in TLS 1.3.
const NODE_SCHEME: SignatureScheme = SignatureScheme::ECDSA_NISTP256_SHA256;

/// Errors from building certificates and configurations and from reading peer certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot encode the node key as PKCS#8: {0}")]
    KeyEncoding(String),
    #[error("cannot build the self-signed certificate: {0}")]
    CertGen(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    #[error("the peer presented {0} certificates; a node sends exactly one")]
    ExtraCertificates(usize),
    #[error("peer certificate is malformed: {0}")]
    MalformedCertificate(String),
    #[error("peer certificate key is not a P-256 key")]
    NotP256,
    #[error("peer certificate self-signature does not verify")]
    BadSelfSignature,
    #[error("peer key mismatch: expected {expected}, got {found}")]
    PinMismatch {
        expected: PublicKey,
        found: PublicKey,
    },
}

/// Make the node's self-signed certificate from its own key, so the certificate's
/// `SubjectPublicKeyInfo` *is* the node key. Valid from 1975 to 4096: expiry means nothing for
/// a pinned key, and a node with an unset clock must still be able to connect.
pub fn self_signed_cert(
    key: &SecretKey,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), TlsError> {
    let pkcs8 = key
        .signing_key()
        .to_pkcs8_der()
        .map_err(|e| TlsError::KeyEncoding(e.to_string()))?;
    let pkcs8 = PrivatePkcs8KeyDer::from(pkcs8.as_bytes().to_vec());
    let key_pair =
        rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(vec![CERT_COMMON_NAME.to_string()])?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, CERT_COMMON_NAME);
    params.not_before = rcgen::date_time_ymd(1975, 1, 1);
    params.not_after = rcgen::date_time_ymd(4096, 1, 1);
    let cert = params.self_signed(&key_pair)?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(pkcs8)))
}

/// The P-256 key inside a node certificate, after checking that the DER parses completely and
/// that the certificate's self-signature verifies. This is the only certificate parser here.
pub fn cert_public_key(cert: &CertificateDer<'_>) -> Result<PublicKey, TlsError> {
    let (rest, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TlsError::MalformedCertificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(TlsError::MalformedCertificate(format!(
            "{} trailing bytes after the certificate",
            rest.len()
        )));
    }
    let spki = parsed.public_key();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve != Some(OID_EC_P256) {
        return Err(TlsError::NotP256);
    }
    let point = p256::ecdsa::VerifyingKey::from_sec1_bytes(&spki.subject_public_key.data)
        .map_err(|_| TlsError::NotP256)?;
    parsed
        .verify_signature(None)
        .map_err(|_| TlsError::BadSelfSignature)?;
    Ok(PublicKey::from_verifying_key(&point))
}

/// The authenticated key of the peer of a finished handshake (client or server side; pass
/// `&ServerConnection` or `&ClientConnection`, both deref to [`CommonState`]).
pub fn peer_key(conn: &CommonState) -> Result<PublicKey, TlsError> {
    match conn.peer_certificates() {
        None | Some([]) => Err(TlsError::NoPeerCertificate),
        Some([cert]) => cert_public_key(cert),
        Some(chain) => Err(TlsError::ExtraCertificates(chain.len())),
    }
}

/// The node's TLS configurations, built once from its key.
pub struct TlsIdentity {
    public: PublicKey,
    cert: CertificateDer<'static>,
    server: Arc<ServerConfig>,
    receptor: Arc<ServerConfig>,
    /// Complete client configuration (certificate, versions, resumption off) whose verifier is
    /// replaced per connection by one pinned to the expected peer.
    client_template: ClientConfig,
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsIdentity({})", self.public.short())
    }
}

impl TlsIdentity {
    pub fn new(key: &SecretKey) -> Result<Self, TlsError> {
        let (cert, private) = self_signed_cert(key)?;
        let provider = ring_provider();

        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(NodeClientVerifier::new(&provider)))
            .with_single_cert(vec![cert.clone()], private.clone_key())?;
        server.alpn_protocols = vec![ALPN_PEER.to_vec(), ALPN_PROBE.to_vec()];
        server.alpn_protocols.extend(
            borg_proto::dna::CELLS
                .iter()
                .skip(1)
                .map(|c| alpn_of(c.name)),
        );
        // No resumption: a resumed session would skip the client verifier.
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.send_tls13_tickets = 0;

        let receptor = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], private.clone_key())?;

        let mut client_template = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedServerVerifier::new(
                Some(key.public()),
                &provider,
            )))
            .with_client_auth_cert(vec![cert.clone()], private)?;
        client_template.alpn_protocols = vec![ALPN_PEER.to_vec()];
        client_template.resumption = Resumption::disabled();

        Ok(Self {
            public: key.public(),
            cert,
            server: Arc::new(server),
            receptor: Arc::new(receptor),
            client_template,
        })
    }

    /// This node's key (the one its certificate carries).
    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// This node's self-signed certificate.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// Node-to-node server: requires a client certificate, accepts any valid self-signed P-256
    /// node certificate; read who connected with [`peer_key`].
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// HTTPS receptor server: TLS 1.3, same certificate, no client authentication, no ALPN
    /// (clients fall back to HTTP/1.1). The receptor authenticates requests by their envelopes.
    pub fn receptor_server_config(&self) -> Arc<ServerConfig> {
        self.receptor.clone()
    }

    /// Node-to-node client for a first contact: presents this node's certificate and accepts
    /// any node key (the handshake signature is still checked against it).
    pub fn client_config_unpinned(&self) -> Arc<ClientConfig> {
        let mut config = self.client_template.clone();
        let provider = config.crypto_provider().clone();
        config
            .dangerous()
            .set_certificate_verifier(Arc::new(PinnedServerVerifier::new(None, &provider)));
        Arc::new(config)
    }

    /// Probe client: like [`Self::client_config`] (or unpinned with `None`), offering only
    /// [`ALPN_PROBE`].
    pub fn probe_client_config(&self, expected: Option<PublicKey>) -> Arc<ClientConfig> {
        let mut config = self.client_template.clone();
        let provider = config.crypto_provider().clone();
        config
            .dangerous()
            .set_certificate_verifier(Arc::new(PinnedServerVerifier::new(expected, &provider)));
        config.alpn_protocols = vec![ALPN_PROBE.to_vec()];
        Arc::new(config)
    }

    /// Node-to-node client for the tree of `cell` (its ALPN, [`alpn_of`]), pinned to
    /// `expected` or, with `None`, accepting any node key (first contact).
    pub fn cell_client_config(&self, expected: Option<PublicKey>, cell: &str) -> Arc<ClientConfig> {
        let mut config = self.client_template.clone();
        let provider = config.crypto_provider().clone();
        config
            .dangerous()
            .set_certificate_verifier(Arc::new(PinnedServerVerifier::new(expected, &provider)));
        config.alpn_protocols = vec![alpn_of(cell)];
        Arc::new(config)
    }

    /// Node-to-node client that presents this node's certificate and accepts the server only if
    /// its certificate carries `expected`.
    pub fn client_config(&self, expected: PublicKey) -> Arc<ClientConfig> {
        let mut config = self.client_template.clone();
        let provider = config.crypto_provider().clone();
        config
            .dangerous()
            .set_certificate_verifier(Arc::new(PinnedServerVerifier::new(
                Some(expected),
                &provider,
            )));
        Arc::new(config)
    }
}

/// Client configuration for command-line tools talking to a receptor: no client certificate,
/// TLS 1.3, no resumption. With `Some(key)` the server must present a node certificate carrying
/// `key`; with `None` any certificate is accepted (the handshake signature is still checked
/// against it), and the caller must authenticate the node by its signed response.
pub fn cli_client_config(expected: Option<PublicKey>) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = ring_provider();
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServerVerifier::new(expected, &provider)))
        .with_no_client_auth();
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

fn ring_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Wrap a certificate rejection for rustls; the typed [`TlsError`] stays reachable through
/// `CertificateError::Other` for callers that want to tell a pin mismatch from garbage.
fn reject(err: TlsError) -> rustls::Error {
    let cert_err = match err {
        TlsError::BadSelfSignature => CertificateError::BadSignature,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(cert_err)
}

/// The key of a node certificate chain: exactly one certificate, checked by [`cert_public_key`].
fn node_chain_key(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Result<PublicKey, rustls::Error> {
    if !intermediates.is_empty() {
        return Err(reject(TlsError::ExtraCertificates(intermediates.len() + 1)));
    }
    cert_public_key(end_entity).map_err(reject)
}

fn tls12_refused() -> rustls::Error {
    rustls::Error::General("TLS 1.2 is not accepted".into())
}

/// Check a TLS 1.3 `CertificateVerify` signature made by a node key.
fn verify_node_tls13(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
    algs: &WebPkiSupportedAlgorithms,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if dss.scheme != NODE_SCHEME {
        return Err(rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme.into());
    }
    rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
}

/// Server verifier used by clients: pinned to one node key, or (CLI only) accepting any
/// certificate.
#[derive(Debug)]
struct PinnedServerVerifier {
    expected: Option<PublicKey>,
    algs: WebPkiSupportedAlgorithms,
}

impl PinnedServerVerifier {
    fn new(expected: Option<PublicKey>, provider: &CryptoProvider) -> Self {
        Self {
            expected,
            algs: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(expected) = self.expected else {
            // Unpinned (CLI without a known key): any certificate; verify_tls13_signature below
            // still proves the server holds its key, and webpki parses the certificate there.
            return Ok(ServerCertVerified::assertion());
        };
        let found = node_chain_key(end_entity, intermediates)?;
        if found != expected {
            return Err(reject(TlsError::PinMismatch { expected, found }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if self.expected.is_some() {
            verify_node_tls13(message, cert, dss, &self.algs)
        } else {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
        }
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        if self.expected.is_some() {
            vec![NODE_SCHEME]
        } else {
            self.algs.supported_schemes()
        }
    }
}

/// Client verifier used by node servers: a client certificate is mandatory and must be a valid
/// self-signed P-256 node certificate; any node may connect, [`peer_key`] says which one did.
#[derive(Debug)]
struct NodeClientVerifier {
    algs: WebPkiSupportedAlgorithms,
}

impl NodeClientVerifier {
    fn new(provider: &CryptoProvider) -> Self {
        Self {
            algs: provider.signature_verification_algorithms,
        }
    }
}

impl ClientCertVerifier for NodeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        node_chain_key(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_node_tls13(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![NODE_SCHEME]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_carries_the_node_key() {
        let key = SecretKey::generate();
        let (cert, private) = self_signed_cert(&key).unwrap();
        assert_eq!(cert_public_key(&cert).unwrap(), key.public());
        assert!(matches!(private, PrivateKeyDer::Pkcs8(_)));
    }

    #[test]
    fn tampered_or_foreign_certificates_are_rejected() {
        let key = SecretKey::generate();
        let (cert, _) = self_signed_cert(&key).unwrap();

        let mut trailing = cert.as_ref().to_vec();
        trailing.push(0);
        assert!(matches!(
            cert_public_key(&CertificateDer::from(trailing)),
            Err(TlsError::MalformedCertificate(_))
        ));

        // Flip a bit in the signature (the last bytes of the DER): parses, self-signature fails.
        let mut bad_sig = cert.as_ref().to_vec();
        let last = bad_sig.len() - 2;
        bad_sig[last] ^= 1;
        assert!(matches!(
            cert_public_key(&CertificateDer::from(bad_sig)),
            Err(TlsError::BadSelfSignature)
        ));

        // A P-384 certificate is a valid certificate but not a node certificate.
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let other = rcgen::CertificateParams::new(vec!["x".to_string()])
            .unwrap()
            .self_signed(&p384)
            .unwrap();
        assert!(matches!(
            cert_public_key(other.der()),
            Err(TlsError::NotP256)
        ));

        assert!(matches!(
            cert_public_key(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])),
            Err(TlsError::MalformedCertificate(_))
        ));
    }

    #[test]
    fn configurations_build() {
        let key = SecretKey::generate();
        let id = TlsIdentity::new(&key).unwrap();
        assert_eq!(id.public_key(), key.public());
        assert_eq!(
            id.server_config().alpn_protocols[..2],
            [ALPN_PEER.to_vec(), ALPN_PROBE.to_vec()]
        );
        assert!(id
            .server_config()
            .alpn_protocols
            .contains(&b"borg-peer/1/cronoTree".to_vec()));
        assert_eq!(cell_of_alpn(b"borg-peer/1/cronoTree"), Some("cronoTree"));
        assert_eq!(cell_of_alpn(ALPN_PEER), Some("peerTreeNet"));
        assert_eq!(cell_of_alpn(b"borg-peer/1/peerTreeNet"), None);
        assert_eq!(cell_of_alpn(b"borg-peer/1/nope"), None);
        assert!(id.receptor_server_config().alpn_protocols.is_empty());
        let other = SecretKey::generate().public();
        assert_eq!(
            id.client_config(other).alpn_protocols,
            vec![ALPN_PEER.to_vec()]
        );
        cli_client_config(None).unwrap();
        cli_client_config(Some(other)).unwrap();
    }
}
