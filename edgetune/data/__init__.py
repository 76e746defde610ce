"""Where feedback becomes training data: parsing, importers, curation rules, PII scrubbing."""
