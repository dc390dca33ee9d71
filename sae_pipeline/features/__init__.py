"""Examples of SAE features: mining contexts from the activation cache and splitting them for the
explainer and the scorers."""
