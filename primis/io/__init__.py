"""File input and output, by concept.

- `primis.io.files`: atomic and durable writes, file modes, a killed writer's leftovers;
- `primis.io.pixels`: a decoded image, its intensity mapping to the model's range, padding;
- `primis.io.images`: reading any supported input, writing PNG, TIFF and .npy;
- `primis.io.dicom`: reading DICOM, and writing the authorized reconstruction as DICOM.
"""
