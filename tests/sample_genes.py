"""Genes of the tiny untrained test models that stand in for the bundled one where it is
not installed: 20 of the most expressed genes of the sample section C2, ERBB2 among them."""

SAMPLE_GENES = (
    "IGKC",
    "IGLC2",
    "ERBB2",
    "IGHG3",
    "TMSB10",
    "PSMB3",
    "IGHA1",
    "MUCL1",
    "ACTG1",
    "TFF3",
    "ACTB",
    "SERF2",
    "PPP1R1B",
    "IGHM",
    "MUC6",
    "PSMD3",
    "PFN1",
    "MIEN1",
    "MGP",
    "DDX5",
)
