//! The upstream response body: hyper's [`Incoming`] plus what the request still holds (its
//! active-request count, its pick, and the HTTP/1 connection or HTTP/2 stream), given back when
//! the body ends or is dropped. An HTTP/1 connection returns to the pool only after a body that
//! ended cleanly; one dropped midway is closed.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};

use super::pool::Completion;
use crate::request::{Body, BoxError};

/// The body of an [`super::UpstreamResponse`]: streams the endpoint's response and releases the
/// connection pool's resources when done. [`UpstreamBody::into_body`] makes it a waypoint
/// [`Body`].
#[derive(Debug)]
pub struct UpstreamBody {
    inner: Incoming,
    completion: Option<Completion>,
}

impl UpstreamBody {
    pub(super) fn new(inner: Incoming, completion: Completion) -> Self {
        let mut body = Self {
            inner,
            completion: Some(completion),
        };
        if body.inner.is_end_stream() {
            // No body at all (204, HEAD, 101...): nothing will poll it.
            body.finish(true);
        }
        body
    }

    /// As the waypoint's boxed [`Body`].
    pub fn into_body(self) -> Body {
        self.map_err(|e| Box::new(e) as BoxError).boxed_unsync()
    }

    fn finish(&mut self, complete: bool) {
        if let Some(mut completion) = self.completion.take()
            && complete
        {
            completion.complete();
        }
    }
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.finish(true),
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.finish(true),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}
