"""recsae's offline library, one package per stage in the order data flows:

    data -> recommenders -> probe -> sae -> concepts / debias -> bundle      (pipeline orchestrates them)

A stage imports only earlier stages and `common`; `service/` imports this library, never the reverse.
docs/architecture.md draws the flow and says where new things go.
"""
