"""hepaseg: liver-tumour segmentation in abdominal CT.

Implements MFCNet (Pang et al., "Correlation Matters: Multi-scale Fine-grained
Contextual Information Extraction for Hepatic Tumor Segmentation", PAKDD 2020)
and the nine networks that paper compares against, on one protocol.

Stages, in the order data flows (imports point down this chain only):
``io`` -> ``data`` -> ``models`` -> ``training`` -> ``evaluation`` ->
``inference`` -> ``viz``; ``cli`` only wires them.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
