"""Generated code for the `zkunlearn.v1` proto package. Do not edit: run tools/protogen.py."""
