# Makes the tiny RData fixtures used by tests/test_geo.py. Run once with Debian's r-base-core +
# r-cran-matrix:  cd tests/data && Rscript make_rdata.R   (then gzip -n -k the .RData files).
library(Matrix)
raw_counts <- sparseMatrix(i = c(1, 3, 2, 5, 4, 1), j = c(1, 1, 2, 3, 4, 4), x = c(3, 1, 7, 2, 5, 1),
                           dims = c(5, 4),
                           dimnames = list(c("GENE_A", "GENE_B", "MT-CO1", "GENE_D", "GENE_E"),
                                           c("AAAC-1", "AAAG-1", "AACT-1", "AAGT-1")))
stopifnot(is(raw_counts, "dgCMatrix"))
save(raw_counts, file = "tiny_counts.RData", compress = "gzip")
write.csv(as.matrix(raw_counts), "tiny_counts_expected.csv")

metadata <- data.frame(cell = c("a", "b"), n = c(1L, 2L))
notes <- "no matrix here"
save(metadata, notes, file = "no_matrix.RData", compress = "gzip")

raw_counts <- sparseMatrix(i = c(1, 2), j = c(1, 2), x = c(0.5, 2), dims = c(2, 2),
                           dimnames = list(c("G1", "G2"), c("C1", "C2")))
save(raw_counts, file = "fractional_counts.RData", compress = "gzip")
