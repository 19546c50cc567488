//! The admission.k8s.io/v1 AdmissionReview wire format, decoded lazily.
//!
//! `object` and `oldObject` are kept as raw JSON and only decoded into the lean views of
//! [`super::objects`] for kinds arcguard inspects, so unrelated fields cost a scan, not an
//! allocation.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

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
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest<'a> {
    /// Identifies this request; echoed in the response.
    pub uid: String,
    /// Kind of the object as sent to the webhook.
    pub kind: GroupVersionKind,
    /// Subresource, e.g. `ephemeralcontainers`.
    #[serde(default)]
    pub sub_resource: Option<String>,
    /// The operation.
    pub operation: Operation,
    /// Namespace of the object; empty or absent for cluster-scoped objects.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Name of the object; may be empty on CREATE with generateName.
    #[serde(default)]
    pub name: Option<String>,
    /// The object after the operation.
    #[serde(borrow, default)]
    pub object: Option<&'a RawValue>,
    /// The object before an UPDATE.
    #[serde(borrow, default)]
    pub old_object: Option<&'a RawValue>,
    /// Whether the request is a dry run.
    #[serde(default)]
    pub dry_run: Option<bool>,
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
    // Serialising plain structs of strings, bools and integers into a Vec cannot fail.
    serde_json::to_vec(&review).unwrap_or_default()
}
