//! Admission control: at most `--max-concurrent-requests` calls are served at once, and calls
//! beyond that are refused at once (tonic answers RESOURCE_EXHAUSTED) instead of queueing.
//! Health checks are always admitted: an overloaded tickd must not be restarted by its
//! liveness probe for being busy.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::Semaphore;
use tonic::codegen::http;
use tower::load_shed::error::Overloaded;
use tower::{BoxError, Layer, Service};

/// Calls to this service are never refused.
const HEALTH_PATH_PREFIX: &str = "/grpc.health.v1.Health/";

/// Adds [`Admission`] around a service.
#[derive(Debug, Clone)]
pub struct AdmissionLayer {
    permits: Arc<Semaphore>,
}

impl AdmissionLayer {
    pub fn new(max_concurrent: usize) -> Self {
        AdmissionLayer {
            permits: Arc::new(Semaphore::new(max_concurrent)),
        }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Admission<S> {
        Admission {
            inner,
            permits: self.permits.clone(),
        }
    }
}

/// Holds a permit for each call until its response is ready.
#[derive(Debug, Clone)]
pub struct Admission<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

impl<S, B> Service<http::Request<B>> for Admission<S>
where
    S: Service<http::Request<B>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let permit = if request.uri().path().starts_with(HEALTH_PATH_PREFIX) {
            None
        } else {
            match self.permits.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => return Box::pin(async { Err(Box::new(Overloaded::new()) as BoxError) }),
            }
        };
        let call = self.inner.call(request);
        Box::pin(async move {
            let result = call.await.map_err(Into::into);
            drop(permit);
            result
        })
    }
}
