//! OCSP for upstream certificates: stapled responses verified and honoured, and queries to the
//! certificate's responder (`revocation = "crl+ocsp"`). Parsing is RustCrypto's `x509-ocsp`;
//! signatures are checked with the same algorithms rustls validates chains with. A response
//! counts only when it is for this certificate (its CertID: issuer name and key hashes, serial),
//! signed by the issuer or by a responder the issuer certified for OCSP signing, and current.

use std::time::{Duration, SystemTime};

use der::asn1::{AnyRef, OctetString};
use der::{Decode, Encode, SliceReader};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, SignatureVerificationAlgorithm};
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::Certificate;
use x509_ocsp::{BasicOcspResponse, CertId, CertStatus, OcspRequest, OcspResponse, OcspResponseStatus, Request};

const SHA1: der::oid::ObjectIdentifier = der::oid::ObjectIdentifier::new_unwrap("1.3.14.3.2.26");
const SHA256: der::oid::ObjectIdentifier = der::oid::ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
const OCSP_BASIC: der::oid::ObjectIdentifier = der::oid::ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.48.1.1");
const EXT_KEY_USAGE: der::oid::ObjectIdentifier = der::oid::ObjectIdentifier::new_unwrap("2.5.29.37");
const OCSP_SIGNING: der::oid::ObjectIdentifier = der::oid::ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.9");
/// Clocks disagree: a response a little from the future still counts.
const SKEW: Duration = Duration::from_secs(300);
/// A response without nextUpdate counts for this long after its thisUpdate.
const NO_NEXT_UPDATE: Duration = Duration::from_secs(24 * 3600);

/// What a verified response says about the certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Good,
    Revoked,
    /// The responder does not know the certificate.
    Unknown,
}

/// The certificate's issuer, as OCSP needs it.
struct Issuer {
    name: Vec<u8>,
    key: SubjectPublicKeyInfoOwned,
}

/// Checks `response` (DER) for the end entity of `chain`; the answer and how long it holds.
pub fn verify(
    response: &[u8],
    chain: &[CertificateDer<'_>],
    roots: &RootCertStore,
    algorithms: &[&dyn SignatureVerificationAlgorithm],
) -> Result<(Answer, Duration), String> {
    let leaf = Certificate::from_der(chain.first().ok_or("no certificate")?).map_err(|e| e.to_string())?;
    let issuer = issuer(&leaf, chain, roots).ok_or("the certificate's issuer is not known")?;
    let response = OcspResponse::from_der(response).map_err(|e| format!("not an OCSP response: {e}"))?;
    if response.response_status != OcspResponseStatus::Successful {
        return Err(format!("the responder answered {:?}", response.response_status));
    }
    let bytes = response.response_bytes.ok_or("a successful response without a body")?;
    if bytes.response_type != OCSP_BASIC {
        return Err(format!("an OCSP response of type {}", bytes.response_type));
    }
    let der = bytes.response.as_bytes();
    let basic = BasicOcspResponse::from_der(der).map_err(|e| format!("not a basic OCSP response: {e}"))?;
    let tbs = first_element(der).ok_or("a basic OCSP response without its signed part")?;
    let signature = basic.signature.raw_bytes();
    let signed_by_issuer = verify_signature(algorithms, &issuer.key, &basic.signature_algorithm, &tbs, signature);
    if !signed_by_issuer && !delegated(&basic, &issuer, algorithms, &tbs, signature) {
        return Err("the response is signed neither by the issuer nor by a responder it certified".into());
    }
    let single = basic
        .tbs_response_data
        .responses
        .iter()
        .find(|single| is_for(&single.cert_id, &leaf, &issuer))
        .ok_or("the response is not for this certificate")?;
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let this_update = single.this_update.0.to_unix_duration();
    if this_update > now + SKEW {
        return Err("the response is from the future".into());
    }
    let until = single.next_update.map_or(this_update + NO_NEXT_UPDATE, |t| t.0.to_unix_duration());
    if until + SKEW < now {
        return Err("the response has expired".into());
    }
    let keep = until.saturating_sub(now).clamp(Duration::from_secs(60), Duration::from_secs(24 * 3600));
    let answer = match single.cert_status {
        CertStatus::Good(_) => Answer::Good,
        CertStatus::Revoked(_) => Answer::Revoked,
        CertStatus::Unknown(_) => Answer::Unknown,
    };
    Ok((answer, keep))
}

/// An OCSP request (DER) for the end entity of `chain`.
pub fn request(chain: &[CertificateDer<'_>], roots: &RootCertStore) -> Result<Vec<u8>, String> {
    let leaf = Certificate::from_der(chain.first().ok_or("no certificate")?).map_err(|e| e.to_string())?;
    let issuer = issuer(&leaf, chain, roots).ok_or("the certificate's issuer is not known")?;
    let sha1 = |data: &[u8]| {
        OctetString::new(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, data).as_ref())
    };
    let cert_id = CertId {
        hash_algorithm: AlgorithmIdentifierOwned { oid: SHA1, parameters: Some(der::asn1::Null.into()) },
        issuer_name_hash: sha1(&issuer.name).map_err(|e| e.to_string())?,
        issuer_key_hash: sha1(issuer.key.subject_public_key.raw_bytes()).map_err(|e| e.to_string())?,
        serial_number: leaf.tbs_certificate.serial_number.clone(),
    };
    let mut request = OcspRequest { tbs_request: Default::default(), optional_signature: None };
    request.tbs_request.request_list.push(Request { req_cert: cert_id, single_request_extensions: None });
    request.to_der().map_err(|e| e.to_string())
}

/// The certificate's OCSP responder (its authority information access), http:// only.
pub fn responder(end_entity: &[u8]) -> Option<String> {
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    let (_, cert) = x509_parser::parse_x509_certificate(end_entity).ok()?;
    cert.extensions().iter().find_map(|ext| {
        let ParsedExtension::AuthorityInfoAccess(aia) = ext.parsed_extension() else { return None };
        aia.accessdescs.iter().find_map(|access| match &access.access_location {
            GeneralName::URI(uri) if access.access_method.to_id_string() == "1.3.6.1.5.5.7.48.1" => {
                uri.starts_with("http://").then(|| uri.to_string())
            }
            _ => None,
        })
    })
}

/// The issuer: the next certificate of the chain whose subject is the end entity's issuer, or
/// a trust anchor of that name (the upstream need not send the root).
fn issuer(leaf: &Certificate, chain: &[CertificateDer<'_>], roots: &RootCertStore) -> Option<Issuer> {
    let name = leaf.tbs_certificate.issuer.to_der().ok()?;
    for der in chain.iter().skip(1) {
        let Ok(cert) = Certificate::from_der(der) else { continue };
        if cert.tbs_certificate.subject.to_der().ok()? == name {
            return Some(Issuer { name, key: cert.tbs_certificate.subject_public_key_info });
        }
    }
    roots.roots.iter().find_map(|anchor| {
        (sequence(anchor.subject.as_ref()) == name).then_some(())?;
        let key = SubjectPublicKeyInfoOwned::from_der(&sequence(anchor.subject_public_key_info.as_ref())).ok()?;
        Some(Issuer { name: name.clone(), key })
    })
}

/// Whether `id` names the end entity `leaf` of `issuer`.
fn is_for(id: &CertId, leaf: &Certificate, issuer: &Issuer) -> bool {
    let algorithm = match id.hash_algorithm.oid {
        oid if oid == SHA1 => &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
        oid if oid == SHA256 => &aws_lc_rs::digest::SHA256,
        _ => return false,
    };
    let hash = |data: &[u8]| aws_lc_rs::digest::digest(algorithm, data);
    id.serial_number == leaf.tbs_certificate.serial_number
        && id.issuer_name_hash.as_bytes() == hash(&issuer.name).as_ref()
        && id.issuer_key_hash.as_bytes() == hash(issuer.key.subject_public_key.raw_bytes()).as_ref()
}

/// Whether a certificate in the response, issued by `issuer` for OCSP signing and valid now,
/// signed it.
fn delegated(
    basic: &BasicOcspResponse,
    issuer: &Issuer,
    algorithms: &[&dyn SignatureVerificationAlgorithm],
    tbs: &[u8],
    signature: &[u8],
) -> bool {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    basic.certs.iter().flatten().any(|responder| {
        let tbs_cert = &responder.tbs_certificate;
        let Ok(tbs_der) = tbs_cert.to_der() else { return false };
        let issued = tbs_cert.issuer.to_der().is_ok_and(|n| n == issuer.name)
            && verify_signature(
                algorithms,
                &issuer.key,
                &responder.signature_algorithm,
                &tbs_der,
                responder.signature.raw_bytes(),
            );
        let current = tbs_cert.validity.not_before.to_unix_duration() <= now + SKEW
            && now <= tbs_cert.validity.not_after.to_unix_duration() + SKEW;
        let for_ocsp = tbs_cert.extensions.iter().flatten().any(|ext| {
            ext.extn_id == EXT_KEY_USAGE
                && x509_cert::ext::pkix::ExtendedKeyUsage::from_der(ext.extn_value.as_bytes())
                    .is_ok_and(|eku| eku.0.contains(&OCSP_SIGNING))
        });
        issued
            && current
            && for_ocsp
            && verify_signature(
                algorithms,
                &tbs_cert.subject_public_key_info,
                &basic.signature_algorithm,
                tbs,
                signature,
            )
    })
}

/// Whether `signature` over `message` verifies with `key` by `algorithm`, among the
/// algorithms rustls accepts.
fn verify_signature(
    algorithms: &[&dyn SignatureVerificationAlgorithm],
    key: &SubjectPublicKeyInfoOwned,
    algorithm: &AlgorithmIdentifierOwned,
    message: &[u8],
    signature: &[u8],
) -> bool {
    let (Some(signature_id), Some(key_id)) = (contents(algorithm), contents(&key.algorithm)) else { return false };
    algorithms
        .iter()
        .filter(|a| a.signature_alg_id().as_ref() == signature_id && a.public_key_alg_id().as_ref() == key_id)
        .any(|a| a.verify_signature(key.subject_public_key.raw_bytes(), message, signature).is_ok())
}

/// An AlgorithmIdentifier's DER without its SEQUENCE header (how webpki names algorithms).
fn contents(algorithm: &AlgorithmIdentifierOwned) -> Option<Vec<u8>> {
    let der = algorithm.to_der().ok()?;
    Some(AnyRef::from_der(&der).ok()?.value().to_vec())
}

/// `contents` wrapped in a SEQUENCE header (trust anchors keep names and keys without it).
fn sequence(contents: &[u8]) -> Vec<u8> {
    let mut out = vec![0x30];
    match contents.len() {
        n if n < 0x80 => out.push(n as u8),
        n if n < 0x100 => out.extend([0x81, n as u8]),
        n => out.extend([0x82, (n >> 8) as u8, n as u8]),
    }
    out.extend_from_slice(contents);
    out
}

/// The first element of a SEQUENCE, exactly as encoded (the signed part of a response).
fn first_element(der: &[u8]) -> Option<Vec<u8>> {
    let outer = AnyRef::from_der(der).ok()?;
    let mut reader = SliceReader::new(outer.value()).ok()?;
    let first: AnyRef<'_> = der::Decode::decode(&mut reader).ok()?;
    first.to_der().ok()
}
