def activation_maximization(*a, **k): raise NotImplementedError
