//! Every error the API returns, and its HTTP status: the one table that maps the two.

use crate::admission::AdmissionError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An API error. The message names the field and the limit, e.g.
/// `input[3] has 9000 tokens; max_input_tokens is 512`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed or invalid request (400).
    #[error("{message}")]
    BadRequest {
        /// What is wrong.
        message: String,
        /// The offending field, when there is one.
        param: Option<String>,
    },
    /// Missing or wrong API key (401).
    #[error("missing or invalid API key (send `Authorization: Bearer <key>`)")]
    Unauthorized,
    /// Body larger than the server accepts (413).
    #[error("{0}")]
    TooLarge(String),
    /// No such route (404).
    #[error("{0}")]
    NotFound(String),
    /// The route exists but not with this method (405).
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The body did not arrive within the body read timeout (408).
    #[error("{0}")]
    BodyTimeout(String),
    /// Wrong content type (415).
    #[error("{0}")]
    UnsupportedMedia(String),
    /// A profile update that breaks a rule (422).
    #[error("{0}")]
    InvalidConfig(String),
    /// A profile update that needs a restart (409).
    #[error("{0}")]
    Conflict(String),
    /// Refused by admission: rate limit or full queue (429 with Retry-After), or a request
    /// larger than the whole queue (400).
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    /// The request's deadline passed while queued (504).
    #[error("{0}")]
    Timeout(String),
    /// Loading, or shutting down (503).
    #[error("{0}")]
    Unavailable(String),
    /// A batch failed (500).
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// A 400 naming the field.
    pub fn bad(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param: Some(param.into()),
        }
    }

    /// The status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::UnsupportedMedia(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::InvalidConfig(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Admission(AdmissionError::NeverFits { .. }) => StatusCode::BAD_REQUEST,
            ApiError::Admission(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ApiError::BadRequest { .. }
            | ApiError::TooLarge(_)
            | ApiError::UnsupportedMedia(_)
            | ApiError::NotFound(_)
            | ApiError::MethodNotAllowed(_)
            | ApiError::BodyTimeout(_) => "invalid_request_error",
            ApiError::Unauthorized => "authentication_error",
            ApiError::InvalidConfig(_) | ApiError::Conflict(_) => "invalid_config",
            ApiError::Admission(AdmissionError::RateLimited { .. }) => "rate_limit_exceeded",
            ApiError::Admission(AdmissionError::QueueFull(_)) => "queue_full",
            ApiError::Admission(AdmissionError::NeverFits { .. }) => "invalid_request_error",
            ApiError::Timeout(_) => "timeout",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "server_error",
        }
    }
}

impl From<crate::embed::EmbedError> for ApiError {
    fn from(e: crate::embed::EmbedError) -> Self {
        use crate::embed::EmbedError as E;
        match e {
            E::Admission(a) => a.into(),
            e @ E::Expired(_) => ApiError::Timeout(e.to_string()),
            E::Batch(m) => ApiError::Internal(m),
            e @ E::Stopped => ApiError::Unavailable(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let param = match &self {
            ApiError::BadRequest { param, .. } => param.clone(),
            ApiError::Admission(AdmissionError::NeverFits { .. }) => Some("input".into()),
            _ => None,
        };
        // OpenAI's error envelope, so existing clients show the message.
        let body = json!({"error": {"message": self.to_string(), "type": self.kind(), "param": param, "code": self.status().as_u16()}});
        let mut resp = (self.status(), axum::Json(body)).into_response();
        let retry = match &self {
            ApiError::Admission(AdmissionError::RateLimited { retry_after_s, .. }) => {
                Some(*retry_after_s)
            }
            ApiError::Admission(AdmissionError::QueueFull(_)) | ApiError::Unavailable(_) => Some(1),
            _ => None,
        };
        if let Some(s) = retry {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}
