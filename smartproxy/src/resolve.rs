//! Target host names to socket addresses.
//!
//! The proxy asks the system resolver (`getaddrinfo`, through tokio's blocking pool).
//! [`Proxy::start_with_resolver`](crate::Proxy::start_with_resolver) takes another one:
//! the test suite answers names itself, so that no query leaves the machine.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;

/// The addresses `host` resolves to; empty when it has none.
pub type Lookup<'a> = Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>>;

pub trait Resolve: Send + Sync + fmt::Debug + 'static {
    fn lookup<'a>(&'a self, host: &'a str, port: u16) -> Lookup<'a>;
}

/// The system's resolver: `/etc/hosts`, DNS, whatever `nsswitch.conf` says.
#[derive(Debug)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn lookup<'a>(&'a self, host: &'a str, port: u16) -> Lookup<'a> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}
