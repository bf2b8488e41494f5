"""Data: identity conversations, general chat to keep skills, mixing, file formats and checks."""
