//! DATA scanner: finds the end of a message (CRLF.CRLF), removes dot-stuffing and
//! detects bare CR / bare LF (SMTP smuggling, CVE-2023-51764). Owned by a helper; stub.
