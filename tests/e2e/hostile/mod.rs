//! Hostile-tenant suite: every attack a tenant could try, asserted refused.

mod tenancy;
