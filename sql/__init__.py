"""The SQL migrations, applied in file-name order; installed as the package `gateway.sql`."""
