//! The admission.k8s.io/v1 AdmissionReview wire format, decoded lazily.
//!
//! `object` and `oldObject` are kept as raw JSON and only decoded into the lean views of
//! [`super::objects`] for kinds arcguard inspects, so unrelated fields cost a scan, not an
//! allocation.

use serde::de::{Error as _, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::view::{DecodedObject, Kind, ObjectSeed};

/// The only AdmissionReview version arcguard speaks (webhooks set `admissionReviewVersions: [v1]`).
pub const API_VERSION: &str = "admission.k8s.io/v1";
/// The AdmissionReview kind.
pub const KIND: &str = "AdmissionReview";

/// Why a request body is not a usable AdmissionReview; answered with HTTP 400.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The body is not JSON of the AdmissionReview shape; `path` names the offending field.
    #[error("invalid AdmissionReview at `{path}`: {message}")]
    Malformed {
        /// The JSON path of the offending field (`.` for the document).
        path: String,
        /// What is wrong there.
        message: String,
    },
    /// The review is of another apiVersion or kind.
    #[error(
        "expected apiVersion {API_VERSION} kind {KIND}, got apiVersion {api_version:?} kind {kind:?}"
    )]
    WrongType {
        /// apiVersion sent.
        api_version: String,
        /// kind sent.
        kind: String,
    },
    /// The review carries no `request`.
    #[error("AdmissionReview has no request")]
    MissingRequest,
    /// The request has an empty uid, so no response could be matched to it.
    #[error("AdmissionReview request.uid is empty")]
    EmptyUid,
    /// CREATE or UPDATE without `request.object`.
    #[error("AdmissionReview request.object is missing for a {operation} of {kind}")]
    MissingObject {
        /// The operation.
        operation: Operation,
        /// The kind.
        kind: String,
    },
    /// The object does not decode as the kind it claims to be.
    #[error("request.{field} is not a valid {kind}: {source}")]
    InvalidObject {
        /// `object` or `oldObject`.
        field: &'static str,
        /// The kind.
        kind: String,
        /// The decoding error (with line and column).
        #[source]
        source: serde_json::Error,
    },
}

/// An incoming AdmissionReview; `object` and `oldObject` borrow from the request body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionReview<'a> {
    /// Must be [`API_VERSION`].
    #[serde(default)]
    pub api_version: String,
    /// Must be [`KIND`].
    #[serde(default)]
    pub kind: String,
    /// The request.
    #[serde(borrow, default)]
    pub request: Option<AdmissionRequest<'a>>,
}

/// The operation being admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Operation {
    /// CREATE.
    Create,
    /// UPDATE.
    Update,
    /// DELETE.
    Delete,
    /// CONNECT.
    Connect,
}

impl Operation {
    /// The wire spelling, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "CREATE",
            Self::Update => "UPDATE",
            Self::Delete => "DELETE",
            Self::Connect => "CONNECT",
        }
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Group, version and kind of the object under review.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct GroupVersionKind {
    /// API group; empty for the core group.
    #[serde(default)]
    pub group: String,
    /// Version.
    #[serde(default)]
    pub version: String,
    /// Kind.
    #[serde(default)]
    pub kind: String,
}

/// The `request` of an AdmissionReview.
///
/// The object under review is decoded in the same pass as the request when the kind (and
/// subresource) precede it in the stream, as the apiserver writes them; otherwise it is kept
/// raw and decoded afterwards.
#[derive(Debug)]
pub struct AdmissionRequest<'a> {
    /// Identifies this request; echoed in the response.
    pub uid: String,
    /// Kind of the object as sent to the webhook.
    pub kind: GroupVersionKind,
    /// Subresource, e.g. `ephemeralcontainers`.
    pub sub_resource: Option<String>,
    /// The operation.
    pub operation: Operation,
    /// Namespace of the object; empty or absent for cluster-scoped objects.
    pub namespace: Option<String>,
    /// Name of the object; may be empty on CREATE with generateName.
    pub name: Option<String>,
    /// The object after the operation, when it was not decoded in the first pass.
    pub object: Option<&'a RawValue>,
    /// The object before an UPDATE, when it was not decoded in the first pass.
    pub old_object: Option<&'a RawValue>,
    /// The object after the operation, decoded in the first pass.
    pub decoded_object: Option<DecodedObject>,
    /// The object before an UPDATE, decoded in the first pass.
    pub decoded_old_object: Option<DecodedObject>,
    /// Whether the request is a dry run.
    pub dry_run: Option<bool>,
}

impl<'de: 'a, 'a> Deserialize<'de> for AdmissionRequest<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(RequestVisitor(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "camelCase")]
enum Field {
    Uid,
    Kind,
    SubResource,
    Operation,
    Namespace,
    Name,
    Object,
    OldObject,
    DryRun,
    #[serde(other)]
    Other,
}

struct RequestVisitor<'a>(std::marker::PhantomData<&'a ()>);

/// Either form of `object` / `oldObject`.
enum ObjectField<'a> {
    Raw(Option<&'a RawValue>),
    Decoded(Option<DecodedObject>),
}

impl<'de: 'a, 'a> Visitor<'de> for RequestVisitor<'a> {
    type Value = AdmissionRequest<'a>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an AdmissionRequest object")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
        let mut uid = None;
        let mut kind: Option<GroupVersionKind> = None;
        let mut sub_resource: Option<Option<String>> = None;
        let mut operation = None;
        let mut namespace = None;
        let mut name = None;
        let mut object = ObjectField::Raw(None);
        let mut old_object = ObjectField::Raw(None);
        let mut dry_run = None;
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::Uid => uid = Some(map.next_value::<String>()?),
                Field::Kind => kind = Some(map.next_value()?),
                Field::SubResource => sub_resource = Some(map.next_value()?),
                Field::Operation => operation = Some(map.next_value()?),
                Field::Namespace => namespace = map.next_value()?,
                Field::Name => name = map.next_value()?,
                Field::DryRun => dry_run = map.next_value()?,
                Field::Object | Field::OldObject => {
                    // Decode in this pass only when the kind is known by now.
                    let seed = kind
                        .as_ref()
                        .zip(sub_resource.as_ref())
                        .and_then(|(k, sub)| {
                            Kind::recognise(&k.group, &k.kind, sub.as_deref()).map(ObjectSeed)
                        })
                        .or_else(|| {
                            kind.as_ref()
                                .filter(|_| sub_resource.is_none())
                                .and_then(|k| Kind::recognise(&k.group, &k.kind, None))
                                .map(ObjectSeed)
                        });
                    let value = match seed {
                        Some(seed) => ObjectField::Decoded(map.next_value_seed(seed)?),
                        None => ObjectField::Raw(map.next_value()?),
                    };
                    if matches!(field, Field::Object) {
                        object = value;
                    } else {
                        old_object = value;
                    }
                }
                Field::Other => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        let split = |field: ObjectField<'a>| match field {
            ObjectField::Raw(raw) => (raw, None),
            ObjectField::Decoded(decoded) => (None, decoded),
        };
        let (object, decoded_object) = split(object);
        let (old_object, decoded_old_object) = split(old_object);
        Ok(AdmissionRequest {
            uid: uid.ok_or_else(|| M::Error::missing_field("uid"))?,
            kind: kind.ok_or_else(|| M::Error::missing_field("kind"))?,
            sub_resource: sub_resource.flatten(),
            operation: operation.ok_or_else(|| M::Error::missing_field("operation"))?,
            namespace,
            name,
            object,
            old_object,
            decoded_object,
            decoded_old_object,
            dry_run,
        })
    }
}

/// Decodes and checks an AdmissionReview body.
///
/// # Errors
/// [`ReviewError`] when the body is not an admission.k8s.io/v1 AdmissionReview with a request
/// and a uid.
pub fn decode(body: &[u8]) -> Result<AdmissionRequest<'_>, ReviewError> {
    let review: AdmissionReview<'_> = match serde_json::from_slice(body) {
        Ok(review) => review,
        // Decode again, tracking the path, only on the error path: it costs on every field.
        Err(plain) => {
            #[derive(Deserialize)]
            #[serde(rename_all = "camelCase")]
            struct TypeMeta {
                api_version: String,
                kind: String,
            }
            // A review of another version fails on its own shape; name the version instead.
            if let Ok(meta) = serde_json::from_slice::<TypeMeta>(body)
                && (meta.api_version != API_VERSION || meta.kind != KIND)
            {
                return Err(ReviewError::WrongType {
                    api_version: meta.api_version,
                    kind: meta.kind,
                });
            }
            let mut de = serde_json::Deserializer::from_slice(body);
            let error = serde_path_to_error::deserialize::<_, AdmissionReview<'_>>(&mut de)
                .err()
                .map(|e| (e.path().to_string(), e.into_inner().to_string()));
            let (path, message) = error.unwrap_or_else(|| (".".into(), plain.to_string()));
            return Err(ReviewError::Malformed { path, message });
        }
    };
    if review.api_version != API_VERSION || review.kind != KIND {
        return Err(ReviewError::WrongType { api_version: review.api_version, kind: review.kind });
    }
    let request = review.request.ok_or(ReviewError::MissingRequest)?;
    if request.uid.is_empty() {
        return Err(ReviewError::EmptyUid);
    }
    Ok(request)
}

/// The raw `request.object`: `object` itself when it was kept raw, or read again from the
/// body when it was decoded in the first pass.
///
/// # Errors
/// The JSON error when the body is not valid JSON.
pub fn raw_object<'a>(
    body: &'a [u8],
    object: Option<&'a RawValue>,
) -> Result<Option<&'a RawValue>, serde_json::Error> {
    #[derive(Deserialize)]
    struct Review<'a> {
        #[serde(borrow)]
        request: Request<'a>,
    }
    #[derive(Deserialize)]
    struct Request<'a> {
        #[serde(borrow, default)]
        object: Option<&'a RawValue>,
    }
    if object.is_some() {
        return Ok(object);
    }
    Ok(serde_json::from_slice::<Review<'a>>(body)?.request.object)
}

/// The `status` of a denied response.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Status {
    /// HTTP-like code shown to the client (403 for policy denials).
    pub code: u16,
    /// The message shown to the client.
    pub message: String,
    /// Machine-readable reason.
    pub reason: &'static str,
}

/// The `response` of an AdmissionReview.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionResponse {
    /// The request's uid.
    pub uid: String,
    /// Whether the request is admitted.
    pub allowed: bool,
    /// Why it is denied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// Warnings returned to the client (kubectl prints them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// `JSONPatch` when `patch` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch_type: Option<&'static str>,
    /// Base64 of the JSON Patch document.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    /// Annotations for the apiserver's audit log: the apiserver prefixes each key with the
    /// webhook's name (`validate.arcguard.io/audit-violations`) and records it on the
    /// request's audit event (admission.k8s.io/v1 AdmissionResponse.auditAnnotations).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub audit_annotations: std::collections::BTreeMap<&'static str, String>,
}

impl AdmissionResponse {
    /// An allowing response with no patch.
    pub fn allow(uid: impl Into<String>) -> Self {
        Self {
            uid: uid.into(),
            allowed: true,
            status: None,
            warnings: Vec::new(),
            patch_type: None,
            patch: None,
            audit_annotations: std::collections::BTreeMap::new(),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResponseReview<'a> {
    api_version: &'static str,
    kind: &'static str,
    response: &'a AdmissionResponse,
}

/// Encodes a response as a complete AdmissionReview document.
pub fn encode(response: &AdmissionResponse) -> Vec<u8> {
    let review = ResponseReview { api_version: API_VERSION, kind: KIND, response };
    // Sized for the strings it carries, so that a denial's kilobyte of message is written
    // without the four reallocations growing from serde_json's default 128 bytes takes.
    let strings = response.status.as_ref().map_or(0, |status| status.message.len())
        + response.warnings.iter().map(String::len).sum::<usize>()
        + response.patch.as_ref().map_or(0, String::len)
        + response.audit_annotations.values().map(String::len).sum::<usize>();
    let mut out = Vec::with_capacity(256 + strings + strings / 8);
    // Serialising plain structs of strings, bools and integers into a Vec cannot fail.
    match serde_json::to_writer(&mut out, &review) {
        Ok(()) => out,
        Err(_) => Vec::new(),
    }
}
