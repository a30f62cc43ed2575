//! The one mapping from PostgreSQL driver errors to messages that name the cause and the fix.

use std::io::ErrorKind;

/// Where the store connects, for messages: `host:port/database` (never the password).
#[derive(Debug, Clone)]
pub struct Server {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
}

impl std::fmt::Display for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{}", self.host, self.port, self.database)
    }
}

/// Turns a driver error into an error whose message names the cause and the fix. The driver
/// error stays in the chain (`{:#}` shows it) for the details.
pub fn database_error(e: sqlx::Error, server: &Server) -> anyhow::Error {
    let hint = hint(&e, server);
    anyhow::Error::new(e).context(hint)
}

fn hint(e: &sqlx::Error, server: &Server) -> String {
    let check_url = "check --database / source.database";
    match e {
        sqlx::Error::Io(io) if matches!(io.kind(), ErrorKind::ConnectionRefused) => format!(
            "cannot connect to PostgreSQL at {}:{} (connection refused): is PostgreSQL running at {}:{}? {check_url}",
            server.host, server.port, server.host, server.port
        ),
        sqlx::Error::Io(io) if matches!(io.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof) => {
            format!(
                "the connection to PostgreSQL at {server} was dropped; if the server restarted, run again with --resume"
            )
        }
        sqlx::Error::Io(io) if io.to_string().contains("failed to lookup address") => {
            format!("cannot resolve the PostgreSQL host {:?}; {check_url}", server.host)
        }
        sqlx::Error::Io(_) => format!("cannot talk to PostgreSQL at {server}; is it running and reachable? {check_url}"),
        sqlx::Error::Tls(_) => format!(
            "the TLS handshake with PostgreSQL at {server} failed; check sslmode in the URL (e.g. ?sslmode=disable for a local server)"
        ),
        sqlx::Error::PoolTimedOut => format!(
            "timed out waiting for a connection to PostgreSQL at {server}; the server may be overloaded or out of \
             connections (max_connections), or unreachable"
        ),
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            match code.as_str() {
                "28P01" | "28000" => format!(
                    "PostgreSQL at {server} refused the login of user {:?}: check the user and password in the URL \
                     (or PGPASSWORD / ~/.pgpass) and pg_hba.conf",
                    server.user
                ),
                "3D000" => format!(
                    "database {:?} does not exist on PostgreSQL at {}:{}; create it (createdb {}) or fix the URL ({check_url})",
                    server.database, server.host, server.port, server.database
                ),
                "3F000" => format!(
                    "the schema named in the URL's search_path does not exist in {server}; create it (CREATE SCHEMA …) \
                     or fix the search_path option"
                ),
                "42501" => format!(
                    "user {:?} lacks a privilege in {server}: {}; GRANT it (the runner tables need CREATE on the schema, \
                     the job's table SELECT and UPDATE)",
                    server.user,
                    db.message()
                ),
                "53100" => format!("the disk of PostgreSQL at {server} is full; free space and run again with --resume"),
                "53300" => format!(
                    "PostgreSQL at {server} has no free connections (too many clients); raise max_connections or run \
                     fewer workers"
                ),
                "57P01" | "57P02" | "57P03" => format!(
                    "PostgreSQL at {server} is shutting down or starting up; wait for it and run again with --resume"
                ),
                "40001" | "40P01" => format!("PostgreSQL at {server} aborted a transaction under contention; it is retried"),
                _ if db.message().contains("no schema has been selected to create in") => format!(
                    "no schema to create the runner tables in: the first schema of the search_path does not exist in \
                     {server}; create it (CREATE SCHEMA …) or fix the search_path option in the URL"
                ),
                _ => format!("PostgreSQL at {server}"),
            }
        }
        _ => format!("PostgreSQL at {server}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> Server {
        Server { host: "db.example".into(), port: 5433, database: "prod".into(), user: "app".into() }
    }

    #[test]
    fn connection_refused_names_host_port_and_the_fix() {
        let e = sqlx::Error::Io(std::io::Error::new(ErrorKind::ConnectionRefused, "refused"));
        let message = format!("{:#}", database_error(e, &server()));
        assert!(message.contains("is PostgreSQL running at db.example:5433?"), "{message}");
        assert!(message.contains("--database"), "{message}");
    }

    #[test]
    fn pool_timeout_is_explained() {
        let message = format!("{:#}", database_error(sqlx::Error::PoolTimedOut, &server()));
        assert!(message.contains("timed out waiting for a connection"), "{message}");
    }
}
