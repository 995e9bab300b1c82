"""The upstream side: the HTTP/1.1 client, its connection pool, TCP options and TCP_INFO."""
