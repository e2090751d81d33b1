"""The node as a client (SCU): echo, store, find, move and get, sending files byte-exact or
converted, the C-MOVE receiver and TLS failure diagnosis."""
