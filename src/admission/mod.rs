//! Admission wire format and request view: an AdmissionReview body decoded, and the view of
//! the object it carries that the rules read.
//!
//! This is the bottom of the core: it knows nothing of rules or policies. The decision is made
//! above, in [`crate::pipeline`].

pub mod objects;
pub mod review;
pub mod view;

pub use review::{AdmissionResponse, Operation, ReviewError};
pub use view::{Kind, RequestView};

/// A decoded AdmissionReview and its view, before the decision.
#[derive(Debug)]
pub struct Prepared<'a> {
    /// The request; `object` and `oldObject` borrow from the body.
    pub request: review::AdmissionRequest<'a>,
    /// The view of an inspected object; `None` for what arcguard does not inspect.
    pub view: Option<RequestView>,
    /// The body, for the rare patch that needs the whole object.
    pub body: &'a [u8],
}

/// Decodes an AdmissionReview body and builds its request view.
///
/// # Errors
/// [`ReviewError`] when the body is not a valid AdmissionReview; the server answers 400.
pub fn prepare(body: &[u8]) -> Result<Prepared<'_>, ReviewError> {
    let mut request = review::decode(body)?;
    let view = RequestView::from_request(&mut request)?;
    Ok(Prepared { request, view, body })
}
