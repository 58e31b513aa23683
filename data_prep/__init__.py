"""Command-line tools that write the HDF5 shards ``ssmpi.data`` reads (docs/DATA.md).

- ``python -m data_prep.convert {hmdb51,ucf101,kinetics,folder} ...``: real datasets;
- ``python -m data_prep.synthetic {motion,frame-prediction} ...``: synthetic datasets;
- ``python -m data_prep.inspect DIR``: counts, sizes and a PNG contact sheet.
"""
