"""Item sources for classification: lesion CSVs over volumes, class folders of 2D images, MedMNIST files."""
