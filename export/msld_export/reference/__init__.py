"""Import of checkpoints trained with the MedSegLatDiff reference implementation
(huynhspm/Generative-Model, commit 3983e93): a safe checkpoint reader, an independent
implementation of its architecture family, and the importer that writes an msld plan."""
