"""The client side: one participant's connection and rounds, the hosts that train for it."""
