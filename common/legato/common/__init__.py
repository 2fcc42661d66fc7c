"""What the daemon and its clients both need, and neither owns.

`paths` (where the daemon keeps its files and listens by default) and `tls`
(reading and checking certificate and key files). `legato.server` and
`legato.client` import this package; it imports neither of them, so the
client never loads the daemon and the daemon never loads the client.
"""
