"""The node as a client (SCU): echo, store, find, move and get (client), sending files byte-exact
or converted (send), the C-MOVE receiver (receiver) and TLS failure diagnosis (tls_diagnosis)."""
