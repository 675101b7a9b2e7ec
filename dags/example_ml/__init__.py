"""Steps of the example ML pipeline. Plain functions: the same code runs in a notebook and in production."""
