"""capture/importers"""
