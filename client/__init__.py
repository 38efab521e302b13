"""The client side: local training of a strategy's update rule and the ClientApp."""
