"""lmforge.recipes"""
