"""Pure mail-format logic: parsing, addresses, reply extraction. No I/O, no SQL."""
