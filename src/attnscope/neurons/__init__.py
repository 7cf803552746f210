"""Context-sensitive neurons of the MLP after the circuit: the token model and effect sizes (``contrast``,
also the ``contrast`` command's computation), the Naive-Bayes-like explanation (``explain``), labels
(``labels``), ground-truth scores (``groundtruth``), neuron discovery (``find``: ``find_neurons``), the
verification against true activations (``evaluation``) and the linear probe (``probe``)."""
