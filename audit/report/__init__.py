"""The audit report: views, pictures, text escaping, the atomic report folder and its templates."""
