//! The serving-certificate controller: provision, renew, rotate and revoke, in a Secret.
