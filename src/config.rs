//! Typed, validated server configuration, passed by value into [`crate::server::serve`]. The CLI
//! builds it from arguments; nothing here reads the environment or globals.

use std::time::Duration;

use crate::nbd::MAX_PAYLOAD;

/// How the NBD server behaves. Build with [`ServerConfig::default`] and adjust fields, then call
/// [`ServerConfig::validate`] (the server does too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Connections served at once; one more is closed at once with a log line. Connections in
    /// the handshake have an allowance of the same size of their own.
    pub max_connections: usize,
    /// Connections one source (TCP address, Unix uid) may have in the handshake at once: idle
    /// connections from one host cannot use up the handshake allowance of everyone.
    pub max_handshakes_per_source: usize,
    /// Serving connections one client identity (certificate, Unix uid, else TCP address) may
    /// hold; the server's own user is exempt.
    pub max_connections_per_client: usize,
    /// Worker threads per connection in the transmission phase (leader/follower: each reads a
    /// request, runs it inline, writes its reply).
    pub workers_per_connection: usize,
    /// The whole handshake (greeting to GO/EXPORT_NAME, STARTTLS included) must finish within
    /// this time (qemu-nbd allows 10 s too).
    pub handshake_timeout: Duration,
    /// Options a client may send in one handshake.
    pub max_options: usize,
    /// Largest option payload accepted; a longer one ends the handshake.
    pub max_option_len: u32,
    /// Largest READ/WRITE length advertised and accepted (NBD_INFO_BLOCK_SIZE maximum).
    pub max_payload: u32,
    /// Preferred block size advertised (raised to the export's encryption sector size when that
    /// is larger). The minimum advertised is always 1 byte.
    pub preferred_block_size: u32,
    /// A rejected WRITE whose payload is at most this long is read and discarded so the
    /// connection survives; a longer one closes the connection after the error reply.
    pub max_discard: u64,
    /// At shutdown, connections get this long to finish requests in flight (a client that stops
    /// reading replies would otherwise block shutdown forever); then they are cut.
    pub shutdown_grace: Duration,
    /// Request buffer memory shared by all connections, beyond the first MiB each worker keeps:
    /// large requests wait for it (and fail with ENOMEM after 30 s), so clients that send
    /// maximum-size requests and stop reading cannot pin more than this.
    pub buffer_budget: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_connections: 64,
            max_handshakes_per_source: 8,
            max_connections_per_client: 16,
            workers_per_connection: 2,
            handshake_timeout: Duration::from_secs(10),
            max_options: 512,
            max_option_len: 64 * 1024,
            max_payload: MAX_PAYLOAD,
            preferred_block_size: 4096,
            max_discard: 64 << 20,
            shutdown_grace: Duration::from_secs(10),
            buffer_budget: 256 << 20,
        }
    }
}

/// A configuration value that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid server configuration: {0}")]
pub struct ConfigError(pub String);

impl ServerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError(m));
        if self.max_connections == 0 {
            return bad("max_connections must be at least 1".into());
        }
        if self.max_handshakes_per_source == 0 || self.max_connections_per_client == 0 {
            return bad(
                "max_handshakes_per_source and max_connections_per_client must be at least 1"
                    .into(),
            );
        }
        if !(1..=64).contains(&self.workers_per_connection) {
            return bad(format!(
                "workers_per_connection must be 1..=64, got {}",
                self.workers_per_connection
            ));
        }
        if self.handshake_timeout.is_zero() {
            return bad("handshake_timeout must be positive".into());
        }
        if self.max_options == 0 {
            return bad("max_options must be at least 1".into());
        }
        // An INFO/GO option must be able to carry a maximal (4096-byte) export name.
        if self.max_option_len < 8 * 1024 {
            return bad(format!(
                "max_option_len must be at least 8192, got {}",
                self.max_option_len
            ));
        }
        if !self.max_payload.is_power_of_two() || !(4096..=MAX_PAYLOAD).contains(&self.max_payload)
        {
            return bad(format!(
                "max_payload must be a power of two in 4096..={MAX_PAYLOAD}, got {}",
                self.max_payload
            ));
        }
        if !self.preferred_block_size.is_power_of_two()
            || !(512..=self.max_payload).contains(&self.preferred_block_size)
        {
            return bad(format!(
                "preferred_block_size must be a power of two in 512..=max_payload, got {}",
                self.preferred_block_size
            ));
        }
        // One maximum-size request must fit, or it could never run.
        if self.buffer_budget < self.max_payload as usize {
            return bad(format!(
                "buffer_budget must be at least max_payload ({}), got {}",
                self.max_payload, self.buffer_budget
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        ServerConfig::default().validate().unwrap();
    }

    #[test]
    fn bad_values_are_refused_with_the_field_name() {
        let mut c = ServerConfig {
            workers_per_connection: 0,
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .0
            .contains("workers_per_connection"));
        c = ServerConfig {
            max_payload: 3000,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().0.contains("max_payload"));
        c = ServerConfig {
            max_connections: 0,
            ..Default::default()
        };
        assert!(c.validate().is_err());
        c = ServerConfig {
            handshake_timeout: Duration::ZERO,
            ..Default::default()
        };
        assert!(c.validate().is_err());
    }
}
